"""The settings of one compression: what the CLI's flags and the app's widgets set, in one dataclass.

Which method, allocation and refine a run uses are names looked up in their registries (methods.py,
strategies.py, refine.REFINES); what each of them needs follows from these settings (methods.needs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..allocation import budget as alloc
from ..allocation.bayes import OBJECTIVES
from ..allocation.importance import ENERGIES, RANKS_OF, check_importance, check_rank_of
from ..allocation.strategies import strategy
from ..common.errors import DipSVDError
from ..common.knobs import knob
from ..lowrank.factors import DEFAULT_WHITENING, WHITENING_FORMS, FactorSpec
from ..refine.choices import COMPENSATIONS, REFINE_CHOICES, REFINES, TuneConfig, refine_choice
from .dobi import DobiConfig
from .handlers import handler, refines


def _methods():
    from .handlers import method_names

    return method_names()


def _allocations():
    from ..allocation.strategies import ALLOCATIONS

    return list(ALLOCATIONS)


@dataclass
class Settings:
    """Every setting of one compression. A method's own options nest inside (Dobi-SVD's `dobi`); each field's knob
    (knobs.py) holds its default, help and flag, which the CLI and the app read."""

    method: str = knob("dipsvd", "the compression method", choices=_methods)
    allocation: str = knob("uniform", "per-block keep ratios (default: uniform, or the method's own)",
                           choices=_allocations)
    ratio: float = knob(0.2, "fraction of targeted parameters REMOVED (0.2 removes 20%, keeps 80%)", kind="ratio")
    weight: float = knob(30.0, "scale of the important channels (DipSVD a)")
    bar: float = knob(0.03, "fraction of channels protected (DipSVD p)")
    whitening: str = knob(DEFAULT_WHITENING, "paper: D G D (Eq. 3); code: the authors' code, SVD of G D",
                          choices=lambda: WHITENING_FORMS)
    compute_dtype: str = knob("float64", "dtype of the whitening and the SVD (float32 for GPUs without fast float64)",
                              choices=lambda: ("float64", "float32"))
    factor_dtype: str = knob("float32", "dtype of the factors stored on disk (bfloat16 halves them)",
                             choices=lambda: ("float32", "bfloat16"))
    refine: str = knob("none", "; ".join(f"{c.name}: {c.help}" for c in REFINE_CHOICES.values())
                       + " (refine is one more streaming pass at build time)", choices=lambda: REFINES)
    compensate: str = knob("auto", "a refined build also refits dense-kept matrices to the drifted inputs, where "
                           "that lowers the held-out error: " + "; ".join(f"{c.name}: {c.help}" for c in COMPENSATIONS.values()),
                           choices=lambda: tuple(COMPENSATIONS))
    p_min: float = knob(0.05, "lowest keep ratio of a block")
    p_max: float = knob(1.0, "highest keep ratio of a block (1 = may stay dense)")
    # global importance (docs/DESIGN.md section 4)
    beta: float = knob(0.25, "Q = S~^beta * R~^(1-beta): weight of Fisher sensitivity")
    tau: float = knob(0.95, "energy threshold of the effective rank")
    energy: str = knob("sigma2", "effective-rank energy: sigma2 (Alg. 5) or sigma (Eq. 11)", choices=lambda: ENERGIES)
    rank_of: str = knob("output", "what the effective rank R_l is taken of: "
                        + "; ".join(f"{k}: {v[0]}" for k, v in RANKS_OF.items()), choices=lambda: tuple(RANKS_OF))
    bo_calls: int = knob(30, "Bayesian optimisation: evaluations", kind="positive")
    bo_objective: str = knob("ppl", "BO objective on held-out calibration text: ppl, or 1 - cosine of the logits",
                             choices=lambda: OBJECTIVES)
    bo_windows: int = knob(4, "held-out windows per BO evaluation", kind="positive")
    seed: int = knob(0, "the seed of the calibration windows and of the search", cli=False)  # --seed: the calibration's
    dobi: DobiConfig = knob(help="Dobi-SVD (--method dobi)", default_factory=DobiConfig)
    tune: TuneConfig = knob(help="block tuning (--refine block)", default_factory=TuneConfig)

    @property
    def spec(self) -> FactorSpec:
        """The factor spec of a factored method (its handler says why another has none)."""
        return handler(self.method).spec(self)

    def check(self) -> "Settings":
        alloc.check_ratio(self.ratio)
        method = handler(self.method)
        strategy(self.allocation)  # an unknown name says which exist
        method.check(self)
        refine_choice(self.refine)  # a clear message for an unknown name
        self.tune.check()
        if self.compensate not in COMPENSATIONS:
            raise DipSVDError(f"unknown compensate '{self.compensate}'; use one of {', '.join(COMPENSATIONS)}")
        if refines(self.refine) and not method.refinable:
            raise DipSVDError(f"refine works on SVD factors; {self.method} rebuilds its weights otherwise: "
                              "use refine none")
        if not 0 < self.p_min <= self.p_max:
            raise DipSVDError(f"need 0 < p_min <= p_max (got {self.p_min}, {self.p_max})")
        check_importance(self.beta, self.tau, self.energy)
        check_rank_of(self.rank_of)
        if self.bo_objective not in OBJECTIVES:
            raise DipSVDError(f"unknown BO objective '{self.bo_objective}'; use ppl or cosine")
        if self.bo_calls < 2:
            raise DipSVDError(f"bo_calls must be at least 2 (the uniform and heuristic warm starts); got {self.bo_calls}")
        if self.bo_windows < 1:
            raise DipSVDError(f"bo_windows must be at least 1; got {self.bo_windows}")
        return self


def settings_dict(s: Settings) -> dict:
    return asdict(s)


def flat_settings(s: Settings) -> dict:
    """Every setting by one name: the nested ones as <field>_<name> (dobi_epochs, dobi_remap, ...), as the app's
    widget keys read them."""
    out = {}
    for name, value in asdict(s).items():
        out.update({f"{name}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return out
