"""The settings of one compression: what the CLI's flags and the app's widgets set, in one dataclass.

Which method, allocation and refine a run uses are names looked up in their registries (methods.py,
strategies.py, refine.REFINES); what each of them needs follows from these settings (methods.needs). A method's
own options are not fields here: each registered options dataclass (common/options.py: dipsvd's weight, bar and
whitening, Dobi-SVD's, block tuning's) is one entry of `options`, read as settings.<name> and given as
Settings(<name>=...) or dataclasses.replace(settings, <name>=...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from ..allocation import budget as alloc
from ..allocation.bayes import OBJECTIVES
from ..allocation.importance import ENERGIES, RANKS_OF, check_importance, check_rank_of
from ..allocation.strategies import strategy
from ..common.errors import DipSVDError
from ..common.knobs import knob
from ..common.options import OPTION_GROUPS, check_options, default_options
from ..lowrank.factors import FactorSpec
from ..refine.choices import COMPENSATIONS, REFINE_CHOICES, REFINES, refine_choice
from .handlers import handler, refines


def _methods():
    from .handlers import method_names

    return method_names()


def _allocations():
    from ..allocation.strategies import ALLOCATIONS

    return list(ALLOCATIONS)


def _own_defaults(attr: str) -> str:
    """The methods' own defaults (MethodHandler.default_allocation or default_refine) in words, from the registry:
    "uniform for svd, svd-llm, ...; nested for dipsvd; ...", for the knobs' help."""
    from .handlers import method_names

    by_value: dict = {}
    for m in method_names():
        by_value.setdefault(getattr(handler(m), attr), []).append(m)
    return "; ".join(f"{value} for {', '.join(ms)}" for value, ms in by_value.items())


@dataclass(init=False)
class Settings:
    """Every setting of one compression. Each field's knob (knobs.py) holds its default, help and flag, which the
    CLI and the app read; each method's own options are in `options` (module docstring)."""

    method: str = knob("dipsvd", "the compression method", choices=_methods)
    allocation: str = knob(None, "per-block keep ratios (default: the method's own: "
                           + _own_defaults("default_allocation") + ")", choices=_allocations)
    ratio: float = knob(0.2, "fraction of targeted parameters REMOVED (0.2 removes 20%, keeps 80%)", kind="ratio")
    compute_dtype: str = knob("float64", "dtype of the whitening and the SVD (float32 for GPUs without fast float64)",
                              choices=lambda: ("float64", "float32"))
    factor_dtype: str = knob("float32", "dtype of the factors stored on disk (bfloat16 halves them)",
                             choices=lambda: ("float32", "bfloat16"))
    refine: str = knob(None, "; ".join(f"{c.name}: {c.help}" for c in REFINE_CHOICES.values())
                       + "; refine is one more streaming pass at build time (default: the method's own: "
                       + _own_defaults("default_refine") + ")", choices=lambda: REFINES)
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
    options: dict = knob(help="each registered method's own options, by name", default_factory=default_options)

    def __init__(self, options: dict | None = None, **given):
        """Settings(ratio=0.3, dipsvd=ChannelOptions(bar=0.05)): a field by its name, a method's options by its
        group's name; the rest at their defaults."""
        groups = {name: given.pop(name) for name in list(given) if name in OPTION_GROUPS}
        for f in dataclasses.fields(self):
            if f.name != "options":
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                setattr(self, f.name, given.pop(f.name, default))
        if given:
            owners = {k: g.name for g in OPTION_GROUPS.values() for k in given if k in g.cls.__dataclass_fields__}
            raise TypeError(f"Settings has no setting {', '.join(map(repr, given))}" + "".join(
                f"; {k} is an option of {o}: Settings({o}=...)" for k, o in owners.items()))
        self.options = {**default_options(), **(options or {}), **groups}
        self._method_defaults()

    def _method_defaults(self) -> None:
        """An allocation or refine not named is the method's own (MethodHandler.default_allocation, default_refine);
        for an unknown method, uniform and none, and check() names the methods."""
        try:
            own = handler(self.method)
        except DipSVDError:
            own = None
        if self.allocation is None:
            self.allocation = own.default_allocation if own else "uniform"
        if self.refine is None:
            self.refine = own.default_refine if own else "none"

    def __getattr__(self, name: str):
        """settings.dipsvd, settings.dobi, settings.tune: a registered group's options (its defaults where these
        settings were made before it was registered)."""
        options = self.__dict__.get("options")
        if options is None or name not in OPTION_GROUPS:
            raise AttributeError(f"Settings has no setting or options named '{name}'")
        return options.get(name) or OPTION_GROUPS[name].cls()

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
        for name in OPTION_GROUPS:
            check_options(getattr(self, name))
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
    """The settings as a report keeps them: each field by its name, each method's options as one nested dict by
    its group's name (dipsvd, dobi, tune)."""
    out = asdict(s)
    return {**{k: v for k, v in out.items() if k != "options"}, **out["options"]}


def flat_settings(s: Settings) -> dict:
    """Every setting by one name: a group's options as <group>_<name> (dipsvd_weight, dobi_epochs, ...), as the
    app's widget keys read them."""
    out = {}
    for name, value in settings_dict(s).items():
        out.update({f"{name}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return out
