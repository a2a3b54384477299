"""Step 3a of the flow: the scaling S in the SVD of W S, one registered strategy per factor method.

What differs between svd, svd-llm, dipsvd, fwsvd and asvd is only S and the calibration data it reads; the SVD,
the factor store and every allocation are shared (factors.py). Each scaling declares
- `needs`: the passes whose data it reads (passes.py): the Grams, the statistics (mean |x|), the Fisher rows;
- `per_matrix`: one S per matrix, or one per input group shared by the group's matrices (q/k/v; gate/up);
- `Options`: its own options, a frozen dataclass of knobs (common/options.py; dipsvd's weight, bar and whitening),
  registered with it under its name: the CLI's flags, the app's widgets and FactorSpec.options come from it;
- `default_allocation`, `default_refine`: what a build gets where the settings do not name them;
- `key(spec)`: what its factors depend on besides the model and the windows (the factor cache key);
- `scale(spec, name, group, data, compute)`: (S, S^-1, n_floored), or None for S = I; S^-1 is None where S is
  lower triangular (a Cholesky factor), which right_inverse solves with instead.
`register_scaling` makes a new one a method everywhere (the CLI, the plan, the sweep, the app): see
tests/run/test_conformance.py for one registered at test time.

The math (docs/DESIGN.md section 3), for a Linear y = W x with input Gram G = X X^T and channel scale D = diag(d):
- "paper" form (DipSVD Eq. 3): G~ = D G D = Q L Q^T, S = Q L^{1/2}, S^{-1} = L^{-1/2} Q^T. Any S with
  S S^T = G~ gives the same rank-k truncation W' = U_k Sigma_k V_k^T S^{-1} (S R for an orthogonal R turns V into
  R^T V), so in float64 S is G~'s Cholesky factor wherever no eigenvalue would be floored (cholesky_root), as
  SVD-LLM's code has it: 1/12 of the eigendecomposition's work.
- "code" form (the authors' public code): SVD of G D = U Sig V^T, S = U Sig^{1/2}, so S S^T = (G D^2 G)^{1/2};
  with D = I this is SVD-LLM's whitening too. In float64, U and Sig^2 come from the eigendecomposition of
  G D^2 G = (G D)(G D)^T: 2.7x faster than the SVD of G D, and squaring costs digits only where
  sigma_i < ~1e-8 sigma_1 (bench/RESULTS.md, "Factors by eigh"); float32 keeps the SVD.
- Diagonal baselines (S^{-1} their inverse, so every rank is still a slice): fwsvd (Hsu et al. 2022),
  S = diag(sqrt(f_j)) with f_j the row-wise Fisher of input channel j; asvd (Yuan et al. 2023),
  S = diag(mean|x_j|^0.5). ASVD's per-layer sensitivity search for the ratios is left out.
Tiny or negative eigenvalues are floored (relative floor, logged) so the math never fails on a singular Gram.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..common.errors import DipSVDError
from ..common.knobs import Widget, knob
from ..common.options import register_options, unregister_options
from ..engine import passes
from ..engine.stats import channel_importance, mirror_lower, row_blocks, upper_gram_add

log = logging.getLogger(__name__)

WHITENING_FORMS = ("paper", "code")
DEFAULT_WHITENING = "code"  # measured best on held-out text: bench/RESULTS.md
EIG_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6}  # eigenvalues below this fraction of the largest are raised to it
DIAG_FLOOR = 1e-6  # diagonal scales below this fraction of the largest are raised to it (dead channels)
ASVD_ALPHA = 0.5  # ASVD's exponent on mean |x_j|


# --- the math ---

def check_channel_scale(weight: float, bar: float) -> None:
    """The channel scale's ranges: a positive weight, a fraction bar."""
    if weight <= 0:
        raise DipSVDError(f"weight must be positive (got {weight}); 1 disables channel protection")
    if not 0 <= bar <= 1:
        raise DipSVDError(f"bar must be a fraction in [0, 1] (got {bar})")


def channel_scale(alpha: torch.Tensor, weight: float, bar: float) -> torch.Tensor:
    """d_j = weight for the top `bar` fraction of channels by alpha (round(bar * n) of them), else 1."""
    check_channel_scale(weight, bar)
    d = torch.ones_like(alpha, dtype=torch.float64)
    n_top = int(round(bar * alpha.numel()))
    if n_top > 0 and weight != 1:
        d[torch.topk(alpha, n_top).indices] = float(weight)
    return d


def _floor(values: torch.Tensor, what: str, rel: float) -> tuple[torch.Tensor, int]:
    top = values.max().clamp_min(0)
    if top <= 0 or not torch.isfinite(top):
        raise DipSVDError(f"the {what} is zero or not finite: this layer saw no usable activations; "
                          "check the calibration text and the model's dtype")
    floor = top * rel
    n = int((values < floor).sum())
    if n:
        log.info("%s: %d of %d eigenvalues floored at %.3g", what, n, values.numel(), floor.item())
    return values.clamp_min(floor), n


def best_seconds(fn, device: torch.device, repeat: int = 2) -> float:
    """The best of `repeat` timed calls of `fn` after a warm-up, a CUDA device synchronised around each (the
    project's one timer of a few calls: eigh_rates, the plan's microbenchmark and rates, the device check)."""
    fn()  # warm-up (the solver's workspace, the first copy)
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def spd_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random symmetric positive-definite n x n matrix (for timing eigh and Cholesky)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    return a @ a.T + n * torch.eye(n, dtype=dtype, device=device)


EIGH_WIDTHS = (512, 1536)  # where eigh_rates measures: latency-bound and cubic enough to fit both terms


def cubic_fit(n1: int, t1: float, n2: int, t2: float) -> tuple[float, float]:
    """(latency seconds, seconds per n^3) of t = a + b n^3 through two measured points, neither below 0."""
    b = max(0.0, (t2 - t1) / (n2**3 - n1**3))
    return max(0.0, t1 - b * n1**3), b


@functools.cache
def eigh_rates(device: torch.device) -> tuple[tuple[float, float], tuple[float, float]]:
    """The float64 eigh time model on `device` and on the host CPU (both copies included): (latency, seconds per
    n^3) each, from SPD matrices at EIGH_WIDTHS (best of 2 each way), measured once per device and process."""
    points = {"device": [], "host": []}
    for width in EIGH_WIDTHS:
        g = spd_matrix(width, torch.float64, device)
        points["device"].append(best_seconds(lambda: torch.linalg.eigh(g), device))
        points["host"].append(best_seconds(lambda: [t.to(device) for t in torch.linalg.eigh(g.cpu())], device))
    n1, n2 = EIGH_WIDTHS
    fits = tuple(cubic_fit(n1, t[0], n2, t[1]) for t in (points["device"], points["host"]))
    log.info("float64 eigh on %s: %s s at widths %s; on the host: %s s", device, points["device"], EIGH_WIDTHS,
             points["host"])
    return fits


def eigh_on_host(device: torch.device, width: int = 1024) -> bool:
    """Whether a float64 eigendecomposition `width` wide of a tensor on `device` is faster on the host CPU, both
    copies included, by the time model measured on this device (eigh_rates): a GPU that loses at 1024, where
    cuSOLVER is latency-bound, may win at 14,336. Consumer GPUs run float64 at 1/32 to 1/64 of their float32 rate,
    data-centre ones at 1/2; on the CPU it is the host."""
    if device.type == "cpu":
        return False
    (a_dev, b_dev), (a_host, b_host) = eigh_rates(device)
    return a_host + b_host * width**3 < a_dev + b_dev * width**3


def symmetric_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh(M), run where it is fastest for M's device and width (eigh_on_host): a float64 matrix on
    a GPU that is slow at float64 goes to the host CPU and the results come back to M's device. Float64 either way;
    the float32 route, far less accurate, is never taken here (bench/RESULTS.md, "Factors by eigh")."""
    if M.dtype == torch.float64 and M.device.type != "cpu" and eigh_on_host(M.device, M.shape[-1]):
        L, Q = torch.linalg.eigh(M.cpu())
        return L.to(M.device), Q.to(M.device)
    return torch.linalg.eigh(M)


def outer_product(A: torch.Tensor) -> torch.Tensor:
    """A A^T from its upper block triangle (stats.upper_gram_add, 10 of 16 blocks' multiplications), mirrored."""
    out = A.new_zeros(A.shape[0], A.shape[0])
    upper_gram_add(out, A.T)
    mirror_lower(out)
    return out


def lower_matmul(W: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """W L for a lower-triangular L: each block of L's columns reads only the rows of L from that block down
    (10 of 16 blocks' multiplications with stats.row_blocks' 4)."""
    out = W.new_empty(W.shape[0], L.shape[1])
    for cols in row_blocks(L.shape[0]):
        out[:, cols] = W[:, cols.start:] @ L[cols.start:, cols]
    return out


def left_singular_by_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, sigma) of A = U Sigma V^T, largest first, from the eigendecomposition A A^T = U Sigma^2 U^T: rounding
    leaves sigma_i accurate to about eps sigma_1 / sigma_i relative, so float64 only (module docstring)."""
    lam, U = symmetric_eigh(outer_product(A))
    return U.flip(1), lam.flip(0).clamp_min(0).sqrt()


def cholesky_root(M: torch.Tensor, rel: float) -> torch.Tensor | None:
    """S = L from the Cholesky factorisation M = L L^T, or None where M is not clearly positive
    definite: the factorisation fails, or a pivot L_jj^2 is below `rel` x M's largest diagonal entry. Every pivot is
    at least M's smallest eigenvalue and that entry at most its largest, so whenever the eigendecomposition would
    floor an eigenvalue at rel x the largest, the check sees a pivot below it too, and the caller takes that route.
    SVD-LLM's own root; about n^3 / 3 multiplications against eigh's ~4 n^3 (bench/RESULTS.md, "Cold statistics
    and factors against plain SVD-LLM"). Its inverse is never formed: right_inverse solves with L where a factor
    needs S^{-1} (only a matrix with more rows than columns does)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return None
    pivots = L.diagonal() ** 2
    if not bool(torch.isfinite(pivots).all()) or float(pivots.min()) < rel * float(M.diagonal().max()):
        return None
    return L


def right_inverse(M: torch.Tensor, S: torch.Tensor | None, S_inv: torch.Tensor | None) -> torch.Tensor:
    """M S^{-1}: M @ S_inv where it is given, a triangular solve where S is a Cholesky factor (S_inv None), M itself
    where there is no scaling (S None)."""
    if S is None:
        return M
    if S_inv is not None:
        return M @ S_inv
    return torch.linalg.solve_triangular(S, M, upper=False, left=False)


def whitening(gram: torch.Tensor, d: torch.Tensor, form: str,
              compute: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(S, S^{-1}, n_floored) for Gram G and channel scale d, in `compute` dtype on the Gram's device; S^{-1} is None
    where S is the lower-triangular Cholesky factor (right_inverse)."""
    G, d = gram.to(compute), d.to(gram.device, compute)
    rel = EIG_FLOOR[compute]
    if form == "paper":  # any S with S S^T = D G D gives the same truncation: Cholesky's where it is safe
        DGD = d[:, None] * G * d[None, :]
        root = cholesky_root(DGD, rel) if compute == torch.float64 else None
        if root is not None:
            return root, None, 0
        L, Q = symmetric_eigh(DGD)
        L, n = _floor(L, "weighted Gram", rel)
        root = L.sqrt()
        return Q * root, Q.T / root[:, None], n
    if form == "code":
        GD = G * d[None, :]
        if compute == torch.float64:  # (G D)(G D)^T = U Sig^2 U^T: U and Sig by a symmetric eigendecomposition
            U, sig = left_singular_by_eigh(GD)
        else:  # squaring the condition number would leave float32 too few digits: the SVD itself
            U, sig, _ = torch.linalg.svd(GD)
        sig, n = _floor(sig, "weighted Gram", rel)
        root = sig.sqrt()
        return U * root, U.T / root[:, None], n
    raise DipSVDError(f"unknown whitening form '{form}'; use one of {', '.join(WHITENING_FORMS)}")


def diagonal_scale(scale: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^{-1}, n_floored) for S = diag(scale); zero (dead) entries are floored so S^{-1} exists."""
    s, n = _floor(scale.double(), what, DIAG_FLOOR)
    return torch.diag(s), torch.diag(1 / s), n


# --- the strategies ---

class WhiteningCost(NamedTuple):
    """What one input group's g x g whitening costs, for the plan's time (plan._whitening_seconds)."""

    svd_in_float32: bool  # float32 takes an SVD rather than an eigendecomposition
    products: int = 0  # g^3 products float64 adds before its eigendecomposition
    cholesky: bool = False  # float64 takes a Cholesky factor (g^3 / 3 products) instead


@dataclass
class ScaleData:
    """The calibration data a block's scalings may read (each scaling reads what its `needs` says)."""

    group_of: dict[str, str] | None = None  # matrix name -> the input group it reads (its Gram's name)
    grams: dict[str, torch.Tensor] | None = None  # group -> (in, in) Gram, float64
    abs_means: dict[str, torch.Tensor] | None = None  # group -> (in,) mean |x_j|
    fisher_rows: dict[str, torch.Tensor] | None = None  # matrix name -> (in,) row-wise Fisher


class Scaling:
    name = ""
    help = ""
    needs: frozenset = frozenset()
    per_matrix = False
    Options: type | None = None  # its own options (a frozen dataclass of knobs), or None where it has none
    # what a build of this method gets where the allocation or the refine is not given (Settings): a baseline
    # keeps its published form (uniform, unrefined); a method may name the path measured best for it
    default_allocation = "uniform"
    default_refine = "none"

    def describe(self, spec) -> str:
        """Its options in words, for the app ("" where it has none)."""
        return ""

    def key(self, spec) -> tuple:
        return (self.name,)

    def scale(self, spec, name: str, group: str, data: ScaleData, compute: torch.dtype):
        return None

    def plan_cost(self, spec) -> WhiteningCost | None:
        """For the plan's time: None where no g x g whitening runs per input group, else its WhiteningCost."""
        return None


class Identity(Scaling):
    name, help = "svd", "plain SVD, no data"


class GramWhitening(Scaling):
    name, help = "svd-llm", "whitened by the input Gram (SVD-LLM)"
    needs = frozenset({passes.GRAMS})

    def scale(self, spec, name, group, data, compute):
        gram = data.grams[group]  # D = I: both forms give S S^T = G; eigh ("paper") is the cheaper one
        return whitening(gram, torch.ones(gram.shape[0], dtype=torch.float64), "paper", compute)

    def plan_cost(self, spec):
        return WhiteningCost(False, cholesky=True)


@dataclass(frozen=True)
class ChannelOptions:
    """DipSVD's own options (settings.dipsvd): the channel scale d (channel_scale) and the whitening form."""

    weight: float = knob(30.0, "scale of the important channels (DipSVD a)", "--weight",
                         widget=Widget("Channel weight a", 1.0, 100.0, 1.0, slider=True))
    bar: float = knob(0.03, "fraction of channels protected (DipSVD p)", "--bar",
                      widget=Widget("Protected fraction bar", 0.0, 0.2, 0.005, "%.3f", slider=True))
    whitening: str = knob(DEFAULT_WHITENING, "paper: D G D (Eq. 3); code: the authors' code, SVD of G D",
                          "--whitening", choices=lambda: WHITENING_FORMS, widget=Widget("Whitening form"))

    def check(self) -> "ChannelOptions":
        check_channel_scale(self.weight, self.bar)
        if self.whitening not in WHITENING_FORMS:
            raise DipSVDError(f"unknown whitening form '{self.whitening}'; use one of {', '.join(WHITENING_FORMS)}")
        return self


class ChannelWeighted(Scaling):
    name, help = "dipsvd", "whitened with the top `bar` channels by alpha weighted by a (DipSVD)"
    needs = frozenset({passes.GRAMS})
    Options = ChannelOptions
    # the best path of bench/RESULTS.md's quality panel: at 0.2, 1.9x / 1.6x the original's perplexity on wiki /
    # news against 8.0x / 4.4x for uniform unrefined
    default_allocation, default_refine = "nested", "sequential"

    def describe(self, spec) -> str:
        o = spec.options
        return f" with a={o.weight:g}, bar={o.bar:g}, {o.whitening} whitening"

    def key(self, spec) -> tuple:
        o = spec.options
        return (self.name, float(o.weight), float(o.bar), o.whitening)

    def scale(self, spec, name, group, data, compute):
        gram, o = data.grams[group], spec.options
        d = channel_scale(channel_importance(gram.double()), o.weight, o.bar)
        return whitening(gram, d, o.whitening, compute)

    def plan_cost(self, spec):
        # code: (G D)(G D)^T then its eigendecomposition, or in float32 the SVD of G D; paper: as svd-llm
        return WhiteningCost(True, 2) if spec.options.whitening == "code" else WhiteningCost(False, cholesky=True)


class FisherRows(Scaling):
    name, help = "fwsvd", "Fisher-weighted rows (FWSVD)"
    needs = frozenset({passes.FISHER})
    per_matrix = True  # the Fisher of each weight differs even inside a shared input group

    def key(self, spec) -> tuple:
        return (self.name, DIAG_FLOOR)  # the Fisher pass's own key is added by the Workbench

    def scale(self, spec, name, group, data, compute):
        if data.fisher_rows is None:
            raise DipSVDError("fwsvd needs the Fisher weights of the calibration loss; pass fisher_rows "
                              "(Workbench.factors does this)")
        return diagonal_scale(data.fisher_rows[name].sqrt(), f"Fisher scale of {name}")


class ActivationMeans(Scaling):
    name, help = "asvd", "activation-scaled channels (ASVD)"
    needs = frozenset({passes.STATISTICS})

    def key(self, spec) -> tuple:
        return (self.name, ASVD_ALPHA, DIAG_FLOOR)

    def scale(self, spec, name, group, data, compute):
        return diagonal_scale(data.abs_means[group].double() ** ASVD_ALPHA, f"activation scale of {group}")


SCALINGS: dict[str, Scaling] = {}


def register_scaling(s: Scaling) -> Scaling:
    """Make `s` a factor method by its name: the CLI, the plan, the sweep and the app list it from here, and its
    Options (if any) become settings.<name>, a flag group and a box of widgets."""
    SCALINGS[s.name] = s
    if s.Options is not None:
        register_options(s.name, s.Options, f"{s.name}: {s.help}", "changes refactor")
    return s


def unregister_scaling(name: str) -> None:
    SCALINGS.pop(name, None)
    unregister_options(name)


def scaling(name: str) -> Scaling:
    if name not in SCALINGS:
        raise DipSVDError(f"unknown method '{name}'; use one of {', '.join(SCALINGS)}")
    return SCALINGS[name]


for _s in (Identity(), GramWhitening(), ChannelWeighted(), FisherRows(), ActivationMeans()):
    register_scaling(_s)
