"""The settings of one compression: what the CLI's flags and the app's widgets set, in one dataclass.

Which method, allocation and refine a run uses are names looked up in their registries (methods.py,
strategies.py, refine.REFINES); what each of them needs follows from these settings (methods.needs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import allocation as alloc
from .bayes import OBJECTIVES
from .errors import DipSVDError
from .factors import DEFAULT_WHITENING, FactorSpec
from .importance import check_importance
from .methods import handler, refines
from .refine import REFINES
from .strategies import strategy


@dataclass
class Settings:
    method: str = "dipsvd"
    allocation: str = "uniform"
    ratio: float = 0.2
    weight: float = 30.0
    bar: float = 0.03
    whitening: str = DEFAULT_WHITENING
    compute_dtype: str = "float64"  # the whitening and the SVD; float32 where float64 is slow (workstation GPUs)
    factor_dtype: str = "float32"  # the factors on disk; bfloat16 halves them for large models
    refine: str = "none"  # "sequential": each block refit to the inputs the compressed blocks before it give (refine.py)
    p_min: float = 0.05
    p_max: float = 1.0
    # global importance (DESIGN.md section 4)
    beta: float = 0.25  # Q_l = S~^beta * R~^(1 - beta)
    tau: float = 0.95  # effective-rank energy threshold
    energy: str = "sigma2"  # "sigma2" (Alg. 5) or "sigma" (Eq. 11)
    bo_calls: int = 30
    bo_objective: str = "ppl"  # "ppl" on held-out calibration text, or "cosine" of final logits
    bo_windows: int = 4  # held-out calibration-split windows (of the Workbench's seqlen) per BO evaluation
    seed: int = 0
    # Dobi-SVD (method "dobi", allocation "trained"); see dobi.DobiConfig
    dobi_epochs: int = 2
    dobi_lr: float = 0.02
    dobi_lambda: float = 100.0
    dobi_windows: int = 4
    dobi_beta: float = 10.0
    dobi_ipca_windows: int | None = None  # None: all calibration windows
    remap: bool = False

    @property
    def spec(self) -> FactorSpec:
        """The factor spec of a factored method (its handler says why another has none)."""
        return handler(self.method).spec(self)

    @property
    def dobi(self):
        from .dobi import DobiConfig

        return DobiConfig(self.dobi_epochs, self.dobi_lr, self.dobi_lambda, self.dobi_windows, self.dobi_ipca_windows,
                          self.dobi_beta, self.remap)

    def check(self) -> "Settings":
        alloc.check_ratio(self.ratio)
        method = handler(self.method)
        strategy(self.allocation)  # an unknown name says which exist
        method.check(self)
        if self.refine not in REFINES:
            raise DipSVDError(f"unknown refine '{self.refine}'; use one of {', '.join(REFINES)}")
        if refines(self.refine) and not method.refinable:
            raise DipSVDError(f"refine works on SVD factors; {self.method} rebuilds its weights otherwise: "
                              "use refine none")
        if not 0 < self.p_min <= self.p_max:
            raise DipSVDError(f"need 0 < p_min <= p_max (got {self.p_min}, {self.p_max})")
        check_importance(self.beta, self.tau, self.energy)
        if self.bo_objective not in OBJECTIVES:
            raise DipSVDError(f"unknown BO objective '{self.bo_objective}'; use ppl or cosine")
        if self.bo_calls < 2:
            raise DipSVDError(f"bo_calls must be at least 2 (the uniform and heuristic warm starts); got {self.bo_calls}")
        if self.bo_windows < 1:
            raise DipSVDError(f"bo_windows must be at least 1; got {self.bo_windows}")
        return self


def settings_dict(s: Settings) -> dict:
    return asdict(s)
