"""Sequential compensation: each block compressed against what the compressed blocks before it feed it.

Every factor method truncates W against the ORIGINAL model's inputs X: its ranks are chosen as if
block l saw the activations of an uncompressed model. After blocks 0..l-1 are compressed, block l
really sees X^, and the error compounds from block to block. `refine` (as in SAES-SVD, and in the
spirit of GPTQ's sequential quantization) takes the allocation's ranks and replaces each factored
matrix by the rank-k matrix closest to the original output on those inputs:

    min over rank(W') <= k  of  ||W X - W' X^||_F^2,

where X (in x tokens) are the inputs of W in the original model and X^ those in the model whose
earlier blocks are already compressed. With the Gram G^ = X^ X^^T and the cross-Gram C = X X^^T:

1. Least-squares target. The unconstrained minimiser solves W' G^ = W C, so W* = W C G^^{-1}. In
   practice G^ is damped, W* = W C (G^ + delta I)^{-1} with delta = 0.01 x its mean eigenvalue (as
   GPTQ damps its Hessian): undamped, the target fits the calibration windows and loses on held-out
   text (measured in bench/RESULTS.md).
   The residual W X - W* X^ is orthogonal to the rows of X^ (normal equations), so for ANY W'
       ||W X - W' X^||^2 = ||W X - W* X^||^2 + ||(W* - W') X^||^2
   (Pythagoras): the first term does not depend on W', and what is left is a whitened truncation.
2. Whitened truncation. ||(W* - W') X^||^2 = ||(W* - W') S||^2 for any S with S S^T = G^, and the best
   rank-k W' is U_k Sigma_k V_k^T S^{-1} from the SVD of W* S (Eckart-Young): the very step every
   factor method already takes, with G^ in place of G. G^^{-1} and S use the same eigenvalue floor.
3. Channel weighting still applies: dipsvd whitens with D G^ D (D from the channel importance of G^,
   with its weight and bar), asvd and fwsvd with their diagonal scales, so step 2 minimises the
   method's own weighted error of W* - W' while step 1 has already absorbed what X^ lost.

4. The residual stream. In a pre-norm block (Llama, Mistral, Qwen2) the block's last Linear writes
   straight into the residual stream: output = r + down_proj(x). The compressed path's residual r^
   has drifted from the original r, and no later matrix of the block can correct that drift. So the
   last Linear's target is the original output plus the drift: Y = W X + (R - R^), giving
   W* = (W C + (R - R^) X^^T) (G^ + delta I)^{-1}, and the block output, not only the matrix output,
   is brought back to the original's (in the spirit of SAES-SVD's alignment with the original model's
   outputs). The last Linear is found by running one window and checking that nothing with weights
   runs after it; otherwise (post-norms, as in Gemma) the plain target is used. Since the original
   block's output is B = R + W X, the numerator is one product, W C + (R - R^) X^^T = (B - R^) X^^T:
   hidden x in per token instead of C's in x in plus the drift's hidden x in (3.7x fewer for
   SmolLM2's down_proj), and the original X of that Linear is not kept at all.

5. Never worse on text it did not fit. The closed form fits the calibration windows it sees; with few of them
   it fits their noise and the refined model can be worse than the unrefined one (bench/RESULTS.md, issue 25).
   So every HOLDOUT-th window (held_windows) is held out: it still flows through both paths, but only the
   other windows' sums G^, C (or the numerator) fit. Each matrix's contenders, all fitted on the fit windows,
   are scored by their output error on the held-out windows, computed from the held-out sums alone
   (||Y - W' X^||^2 = ||Y||^2 - 2 tr(W' T^T) + tr(W' G^ W'^T), T = W C or the numerator, _GroupStats.held_error):
   - the unrefined factors (W truncated against the original inputs' Gram of the fit windows);
   - the refined ones at each damping tau in TAUS, as ridge regression towards those unrefined factors W0,
         W*_tau = (W C + delta W0) (G^ + delta I)^{-1},  delta = tau x the mean eigenvalue of G^,
     which runs from the plain least squares (tau -> 0) back to W0 itself (tau -> infinity).
   The winner is refitted on every window (the unrefined one is the factor pass's own). Then the block as a
   whole: the block with every matrix at its fit-window winner against the block with the fit-window unrefined
   factors, on the held-out windows, each against the original block's output (_Contest); where the refined
   block is not closer, the block ships its unrefined factors, and the next block sees their outputs. With
   refine "block", a third contender is the refined block trained by AdamW on its parameters (TuneConfig)
   (the second stage of AA-SVD, arXiv 2604.02119), kept only where it wins there too.

The pass streams like the statistics pass (stream.py), with two sets of activations: the original
path and the compressed one. For block l it runs the original block once, keeping every input
group's X; then, group by group in the order the block calls them (q/k/v, o, gate/up, down), it runs
the block on the compressed path with the groups before already refined, stopping at the group, to
take X^ (so o_proj and down_proj are fitted to the inputs they will really see), and refines the
group's factored matrices; finally the refined block's outputs on the compressed path become block
l+1's inputs (one more run, with the attention replayed; keeping the last Linear's X^ to skip it would hold
windows x seqlen x intermediate). On the compressed path a refined
matrix runs as its two factors in place of the Linear's own forward (the dense product is not
computed), and a child of the block that has finished with all its matrices refined (the attention,
once o_proj is) is replayed from its kept outputs instead of being run again for the later groups.
Dense-kept matrices stay the original's. Refining is a build step: the allocation (ranks) comes from
the fast factor-once path.

The code keeps the pass's three jobs apart, as GPTQ keeps `add_batch` apart from `fasterquant`:
`_GroupStats` gathers, window by window, what one input group's closed form needs (G^, and C or the
last Linear's whole numerator); `_BlockWalk` walks one block on both paths (the original run that takes
every X, the compressed runs that stop at a group, the replayed children, the refined forwards put in
place); `_closed_form` solves a group (steps 1 to 3: the least-squares target, then the whitened
truncation through factors.factor_model). `refine` strings them together block by block.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..common.errors import DipSVDError
from ..common.knobs import knob
from ..engine.data import DEFAULT_SEQLEN, DEFAULT_WINDOWS, HOLDOUT, is_held
from ..engine.stats import SIXTEEN_BIT, matmul_precision
from ..engine.stream import BlockInputs, block_on_device, capture_inputs, release_host_memory
from ..lowrank.factors import DTYPES, EIG_FLOOR, FactorSpec, factor_matrix
from ..lowrank.scalings import ScaleData, symmetric_eigh
from ..model.models import find_blocks, offload_hooks, weights_of


@dataclass(frozen=True)
class RefineChoice:
    """A `--refine` choice: whether a build runs the refine pass, and whether that pass also tunes each block."""

    name: str
    refits: bool
    tunes: bool
    help: str


REFINE_CHOICES = {c.name: c for c in (
    RefineChoice("none", False, False, "the factors as the allocation slices them"),
    RefineChoice("sequential", True, False, "each block refitted in closed form to the compressed inputs, where "
                                            "that lowers the held-out error"),
    RefineChoice("block", True, True, "sequential, then each block trained as AA-SVD's second stage (AdamW on "
                                      "every parameter of the block) where that pays"))}
REFINES = tuple(REFINE_CHOICES)


def refine_choice(name: str) -> RefineChoice:
    if name not in REFINE_CHOICES:
        raise DipSVDError(f"unknown refine '{name}'; use one of {', '.join(REFINES)}")
    return REFINE_CHOICES[name]
@dataclass(frozen=True)
class Compensation:
    """A `--compensate` choice: which dense-kept matrices of a block refine refits in closed form to the drifted
    inputs the compressed blocks before it produce (same target and held-out choice as a factored matrix's, no
    truncation, so no parameter is added); `picks(walk, name)` says whether a dense matrix is one of them."""

    name: str
    picks: object
    help: str


COMPENSATIONS = {c.name: c for c in (
    Compensation("none", lambda walk, n: False, "dense matrices stay the original's"),
    Compensation("outputs", lambda walk, n: walk.solo(n), "the dense matrices that alone read their input (o_proj "
                                                          "and down_proj in Llama): they write the residual stream"),
    Compensation("all", lambda walk, n: True, "every dense matrix"))}


@dataclass(frozen=True)
class TuneConfig:
    """Block tuning (refine "block"), the second stage of AA-SVD (arXiv 2604.02119) with its settings as defaults:
    AdamW, a linear warm-up then cosine decay, gradient clipping, float32 master weights."""

    epochs: int = knob(25, "block tuning: epochs over the fit windows", "--tune-epochs", "positive")
    lr: float = knob(1e-4, "block tuning: AdamW's peak learning rate", "--tune-lr")
    weight_decay: float = knob(0.01, "block tuning: AdamW's weight decay", "--tune-weight-decay")
    warmup: float = knob(0.1, "block tuning: share of the steps that warm up linearly (then cosine decay to 0)",
                         "--tune-warmup")
    clip: float = knob(1.0, "block tuning: the gradients' norm is clipped to this (0: no clipping)", "--tune-clip")
    scope: str = knob("block", "block tuning trains: factors (the low-rank factors), or block (every parameter of "
                               "the block: factors, dense matrices, norms; an offloaded block tunes its factors)",
                      "--tune-scope", choices=lambda: TUNE_SCOPES)

    def check(self) -> "TuneConfig":
        if self.scope not in TUNE_SCOPES:
            raise DipSVDError(f"unknown tune scope '{self.scope}'; use one of {', '.join(TUNE_SCOPES)}")
        if not (self.epochs >= 1 and self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup < 1
                and self.clip >= 0):
            raise DipSVDError("block tuning needs epochs >= 1, lr > 0, weight_decay >= 0, 0 <= warmup < 1 and "
                              f"clip >= 0 (got {self.epochs}, {self.lr}, {self.weight_decay}, {self.warmup}, "
                              f"{self.clip})")
        return self


TUNE_SCOPES = ("factors", "block")


def lr_scale(step: int, total: int, warmup: float) -> float:
    """The learning rate's multiple at `step` of `total`: linear warm-up over the first `warmup` share of the steps
    (at least one), then cosine decay to 0."""
    warm = max(1, round(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


DAMP = 0.01  # delta = DAMP x mean eigenvalue of G^ in the plain least-squares target (GPTQ's percdamp)
TAUS = (0.01, 0.1, 1.0, 10.0)  # the candidate dampings (ridge towards the unrefined factors) held-out windows choose
RESIDUAL = True  # the block's last Linear also takes back the residual stream's drift


CHOL_MARGIN = 100.0  # Cholesky when delta >= this x (the eigenvalue floor's bound): the floor cannot matter


def solver(gram_hat: torch.Tensor, compute: torch.dtype = torch.float64, damp: float = 0.0):
    """(solve, n_floored) with solve(M) = M (G^ + delta I)^{-1}, delta = damp x the mean eigenvalue of G^ (GPTQ's
    dampening). Undamped, or where delta could be near the eigenvalue floor, the inverse comes from the
    floored eigendecomposition (eigenvalues below EIG_FLOOR x the largest raised to it). Damped as refine
    damps, every eigenvalue of G^ + delta I is at least delta, far above any floor (delta >= CHOL_MARGIN x
    EIG_FLOOR x trace >= CHOL_MARGIN x the floor), so a Cholesky solve gives the same matrix, about 5x
    faster than the eigendecomposition (measured at 1536 x 1536); one solver serves a whole input group."""
    G = gram_hat.to(compute)
    trace = G.diagonal().sum()
    if not trace > 0 or not torch.isfinite(trace):
        raise DipSVDError("the compressed model's activations have a zero or non-finite Gram; nothing to refine "
                          "against (check the calibration text and the model's dtype)")
    delta = damp * trace / G.shape[0]
    if damp > 0 and delta >= CHOL_MARGIN * EIG_FLOOR[compute] * trace:
        chol, info = torch.linalg.cholesky_ex(G + delta * torch.eye(G.shape[0], dtype=compute, device=G.device))
        if int(info) == 0:
            return (lambda M: torch.cholesky_solve(M.to(compute).T, chol).T), 0
    L, Q = symmetric_eigh(G)
    top = L.max()
    if not top > 0 or not torch.isfinite(top):
        raise DipSVDError("the compressed model's activations have a zero or non-finite Gram; nothing to refine "
                          "against (check the calibration text and the model's dtype)")
    floor = top * EIG_FLOOR[compute]
    n = int((L < floor).sum())
    inv = (Q / (L.clamp_min(floor) + delta)) @ Q.T
    return (lambda M: M.to(compute) @ inv.to(M.device)), n


def least_squares_target(W: torch.Tensor, cross: torch.Tensor, gram_hat: torch.Tensor,
                         compute: torch.dtype = torch.float64, damp: float = 0.0,
                         solve=None) -> tuple[torch.Tensor, int]:
    """(W* = W C (G^ + delta I)^{-1}, eigenvalues floored) with delta = damp x the mean eigenvalue of G^; `solve`
    (from `solver`) reuses one factorisation of G^ for every matrix of an input group."""
    n = 0
    if solve is None:
        solve, n = solver(gram_hat, compute, damp)
    return solve(W.to(compute) @ cross.to(compute, copy=False).to(W.device)), n


def _replace_forward(module: nn.Module, forward):
    """Run `forward` instead of the module's own; returns the function that puts the old one back (an instance
    forward already there, as accelerate's offload hook installs, is kept and restored)."""
    old = module.__dict__.get("forward")
    module.forward = forward

    def restore():
        if old is None:
            del module.forward
        else:
            module.forward = old
    return restore


def _low_rank(u: torch.Tensor, v: torch.Tensor | None, bias: torch.Tensor | None):
    """The forward of the pair (u, v), or of the dense matrix u where v is None, in the inputs' dtype (the float32
    masters of block tuning run on a bfloat16 model's activations)."""
    def forward(x):
        z = x if v is None else nn.functional.linear(x, v.to(x.dtype))
        z = nn.functional.linear(z, u.to(x.dtype))
        return z + bias.to(z.dtype) if bias is not None else z
    return forward


FULL = -1  # the "rank" of a dense matrix that refine refits (compensation) without truncating it


def _product(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    return u if v is None else u @ v


def _replay(outputs: list, current: list, park: "_Park"):
    """A forward that returns the kept output of the current window, as a copy: a block may add to what a child
    returns in place (a cheap copy next to the child's own cost)."""
    def fresh(y):
        if isinstance(y, torch.Tensor):
            return y.clone()
        return type(y)(fresh(v) for v in y) if isinstance(y, tuple) and not hasattr(y, "_fields") else y

    def forward(*args, **kwargs):
        return fresh(park.get(outputs[current[0]]))
    return forward


PARK_CHECK = False  # tests only: see _Park


class _Stop(Exception):
    """Raised by a pre-hook once the input it waits for is taken: the rest of the block is not run."""


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise DipSVDError(f"NaN or infinite activations at {name} while refining; load the model in float32")
    return x


class _Park:
    """Where refine keeps its per-window activations between uses (the two paths' block inputs and outputs, each
    group's original inputs X, a replayed child's outputs): in host memory when the blocks run on a GPU, one
    window's brought back to the device at a time (Llama-3-8B at 256 x 2048: 4.3 GB per set of activations,
    several sets), else where they are. `get` gives a kept tensor (or tuple) back on the device.
    With PARK_CHECK (tests only) a kept tensor is wrapped in _Parked, which no torch operation takes: a use that
    forgets `get` then fails on the CPU as it would on a GPU."""

    def __init__(self, device: torch.device):
        self.device, self.host = device, device.type == "cuda"

    def put(self, x):
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self.put(v) for v in x)
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to("cpu") if self.host else x
        return _Parked(x) if PARK_CHECK else x

    def get(self, x):
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self.get(v) for v in x)
        if isinstance(x, _Parked):
            x = x.tensor
        return x.to(self.device) if isinstance(x, torch.Tensor) else x


class _Parked:
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _Sums:
    """One part's sums (the fit windows' or the held-out windows'), in float64: the Gram G^ = X^ X^^T and the
    cross-Gram C = X X^^T (a plain group) or the numerator (B - R^) X^^T (the residual-writing Linear). A held
    part also has what the error's constant term needs: X X^T (plain, from the original path;
    ||W X||^2 = tr(W X X^T W^T)) or ||B - R^||^2 (the residual-writing Linear)."""

    def __init__(self, held: bool):
        self.held = held
        self.gram = self.cross = self.numerator = self.gram_x = None
        self.target_sq = 0.0
        self.windows = 0

    def add_gram(self, xh: torch.Tensor) -> None:
        self.add("gram", (xh.T @ xh).double())
        self.windows += 1

    def add(self, name: str, value: torch.Tensor) -> None:
        """value (a fresh tensor of the caller's) added into the sum in place: no third g x g matrix meanwhile."""
        old = getattr(self, name)
        setattr(self, name, value if old is None else old.add_(value))


def gram_precision(*xs: torch.Tensor) -> str:
    """The float32 matmul precision for products of these inputs: TF32 where all are 16-bit on CUDA (exact for
    them, float32 accumulation: the statistics pass's rule, stats.GramAccumulator.add), else as set."""
    sixteen = all(x.dtype in SIXTEEN_BIT and x.is_cuda for x in xs)
    return "tf32" if sixteen else torch.backends.cuda.matmul.fp32_precision


class _GroupStats:
    """The accumulator of one input group: what its closed form needs, added window by window on the
    compressed path, each window into its part (`held`: the indices of the held-out windows, scored and not
    fitted; empty: every window is fitted). Always the Gram G^ = X^ X^^T, (in, in). A plain group adds the
    cross-Gram C = X X^^T, (in, in), with X the original inputs; the residual-writing Linear (`full`) adds
    instead the whole numerator (B - R^) X^^T, (hidden, in). Nothing is kept per window. `gram`, `cross` and
    `numerator` are the fit part's."""

    def __init__(self, full: bool, held: frozenset = frozenset()):
        self.full, self.held_windows = full, held
        self.fit, self.held = _Sums(False), _Sums(True)
        self.orig_fit: torch.Tensor | None = None  # the original inputs' X X^T on the fit windows (set by the walk)
        self._terms: dict[str, tuple] = {}  # matrix -> (||W X||^2, W C) on the held-out windows (held_error)

    gram = property(lambda self: self.fit.gram)
    cross = property(lambda self: self.fit.cross)
    numerator = property(lambda self: self.fit.numerator)

    def _part(self, i: int) -> _Sums:
        return self.held if i in self.held_windows else self.fit

    def add(self, i: int, xh: torch.Tensor, x: torch.Tensor) -> None:
        """A plain group's window i: X^ (tokens, in) and the original X (tokens, in), multiplied in float32."""
        part = self._part(i)
        with matmul_precision(gram_precision(xh, x)):
            xh = xh.float()
            part.add_gram(xh)
            part.add("cross", (x.float().T @ xh).double())

    def add_residual(self, i: int, x_raw: torch.Tensor, r_h: torch.Tensor, block_out: torch.Tensor) -> None:
        """The residual-writing Linear's window i: its input X^ (tokens, in), the compressed path's residual r^
        (tokens, hidden) and the original block's output B, whatever its shape."""
        part, xh = self._part(i), x_raw.float()
        # B - R^ with B the original block's output: (B - R^) X^^T = W C + (R - R^) X^^T
        d = block_out.reshape(-1, r_h.shape[-1]) - r_h
        with matmul_precision(gram_precision(x_raw, d)):
            d = d.float()
            part.add("numerator", (d.T @ xh).double())
            part.add_gram(xh)
        if part.held:
            part.target_sq += float(d.double().pow(2).sum())

    def total(self) -> _Sums:
        """Both parts summed: what the chosen damping is refitted on. Summed into the fit part in place, the held-out
        part let go (neither is read once the contenders are chosen): at Llama-3-8B's down_proj each is 1.6 GB."""
        for name in ("gram", "cross", "numerator"):
            held = getattr(self.held, name)
            if held is not None:
                fit = getattr(self.fit, name)
                setattr(self.fit, name, held if fit is None else fit.add_(held))
                setattr(self.held, name, None)
        self.fit.windows += self.held.windows
        self.held.windows = 0
        return self.fit

    def check(self, name: str) -> None:
        for part in (self.fit, self.held):
            if part.windows:  # a NaN in any window's X or X^ reaches G^ or C: one check per group and part
                _check(part.gram, name)
                _check(part.numerator if self.full else part.cross, name)

    def held_error(self, W: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, key: str | None = None) -> float:
        """||Y - u v X^||^2 on the held-out windows, from their sums alone (Y = W X, or B - R^ for the
        residual-writing Linear): ||Y||^2 - 2 tr(u v T^T) + tr(u^T u v G^ v^T) with T = W C or the numerator.
        With `key` (the matrix's name) ||Y||^2 and T are computed once for every contender of that matrix."""
        h = self.held
        dev = h.gram.device
        u, v = u.double().to(dev), None if v is None else v.double().to(dev)
        if self.full:
            const, T = h.target_sq, h.numerator
        elif key is not None and key in self._terms:
            const, T = self._terms[key]
        else:
            Wd = W.double().to(dev)
            const, T = float(((Wd @ h.gram_x) * Wd).sum()), Wd @ h.cross
            if key is not None:
                self._terms[key] = const, T
        if v is None:  # a dense refit: tr(u G^ u^T) and tr(u T^T)
            return const - 2 * float((u * T).sum()) + float(((u @ h.gram) * u).sum())
        quad = float(((u.T @ u) * (v @ h.gram @ v.T)).sum())
        return const - 2 * float(((u.T @ T) * v).sum()) + quad


class _BlockWalk:
    """One block on both paths. `run_original` runs the original block once and keeps every input group's X;
    `compressed_inputs` runs the compressed path up to one group; `install` puts a refined matrix in place on
    the compressed path; `advance` gives the next block its compressed-path inputs; `restore` puts every
    replaced forward back, leaving the model as it came."""

    def __init__(self, block: nn.Module, base: str, wanted: set[str], orig: BlockInputs, hat: BlockInputs,
                 park: _Park, held: frozenset | None = None):
        self.block, self.orig, self.hat, self.park, self.base = block, orig, hat, park, base
        self.held = held  # the held-out windows when refine validates (then the original Grams are summed)
        self.orig_grams: dict[str, list] = {}  # group -> [X X^T on the fit windows, on the held-out ones]
        self.n_win = len(orig.hidden)
        self.linears = {f"{base}.{n}": m for n, m in block.named_modules()
                        if isinstance(m, nn.Linear) and f"{base}.{n}" in wanted}
        self.group_of: dict[str, str] = {}  # Linear -> the first Linear called on the same input tensor
        self.taken: dict[str, list[torch.Tensor]] = {}  # group -> its original inputs X per window, (tokens, in)
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # this window's inputs so far (shared inputs once)
        self.unkept: set[str] = set()  # groups whose original inputs X are not needed
        self.current = [0]  # the window the compressed path is running, for the children's kept outputs
        self.kept: dict[nn.Module, list] = {}  # a finished child's output per window, while it is being recorded
        self.calls: dict[nn.Module, int] = {}
        self.replayed: set[nn.Module] = set()
        self.children = [m for m in block.children() if any(isinstance(x, nn.Linear) for x in m.modules())]
        self.swaps: list = []  # restore functions of the replaced forwards, undone when the block is done

    def _take(self, name: str):
        def hook(module, args):
            x = args[0]
            hit = self.seen.get(id(x))
            if hit is not None and hit[0] is x:
                self.group_of[name] = hit[1]
                return
            self.seen[id(x)] = (x, name)
            self.group_of[name] = name
            part = int(self.held is not None and self.current[0] in self.held)
            # the original inputs' Gram X X^T, fit and held-out parts apart (the residual-writing Linear's held-out
            # error reads ||B - R^||^2 instead: its held-out part is not needed)
            if self.held is not None and not (part and name in self.unkept):
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                parts = self.orig_grams.setdefault(name, [None, None])
                with matmul_precision(gram_precision(x)):
                    g = (flat.T @ flat).double()
                parts[part] = g if parts[part] is None else parts[part] + g
            if name not in self.unkept:
                self.taken.setdefault(name, []).append(self.park.put(x.detach().reshape(-1, x.shape[-1])))
        return hook

    def solo(self, name: str) -> bool:
        """Whether `name` alone reads its input (known once run_original has grouped the inputs)."""
        return sum(g == self.group_of.get(name) for g in self.group_of.values()) == 1

    def residual_writer(self, ranks: dict[str, int | None]) -> str | None:
        """The block's last Linear when nothing with weights runs after it: it writes straight into the residual
        stream (Llama, Mistral, Qwen2: block output = r + down_proj(x)), and its target also takes back the drift
        r - r^ (4. in the module docstring). None when it shares its inputs or stays dense (the plain targets).
        One window finds it; the probe only groups the inputs, it keeps none."""
        finished: list[nn.Module] = []
        leaves = [m for m in self.block.modules() if next(m.parameters(recurse=False), None) is not None]
        probes = [m.register_forward_hook(lambda mod, a, y: finished.append(mod)) for m in leaves]
        probes += [m.register_forward_pre_hook(self._take(n)) for n, m in self.linears.items()]
        self.unkept.update(self.linears)
        held, self.held = self.held, None  # the probe sums nothing
        try:
            self.block(self.park.get(self.orig.hidden[0]), **self.orig.kwargs[0])
        finally:
            self.held = held
            for h in probes:
                h.remove()
        last = next((n for n, m in self.linears.items() if finished and m is finished[-1]), None)
        alone = [n for n in self.linears if self.group_of.get(n) == last]
        if last is None or alone != [last] or ranks.get(last) is None:
            last = None
        self.unkept.clear()
        self.group_of.clear()
        self.seen.clear()
        return last

    def run_original(self, last: str | None) -> list[str]:
        """1. The original block, window by window: every group's original inputs X (but `last`'s, whose target
        takes the block's outputs instead), and the original path's next inputs. Returns the groups' leaders in
        the order the block calls them."""
        if last is not None:
            self.unkept.add(last)
        handles = [m.register_forward_pre_hook(self._take(n)) for n, m in self.linears.items()]
        try:
            for i in range(self.n_win):
                self.seen.clear()
                self.current[0] = i
                out = _block_out(self.block(self.park.get(self.orig.hidden[i]), **self.orig.kwargs[i]))
                self.orig.hidden[i] = self.park.put(out)
        finally:
            for h in handles:
                h.remove()
        self.seen.clear()
        return [n for n in self.group_of if self.group_of[n] == n]

    def _record(self, child: nn.Module):
        def hook(module, args, kwargs, y):
            self.calls[module] = self.calls.get(module, 0) + 1
            self.kept.setdefault(module, [None] * self.n_win)[self.current[0]] = self.park.put(y)
        return hook

    def compressed_inputs(self, leader: str, full: bool, held: frozenset = frozenset()) -> _GroupStats:
        """2. This group's compressed-path inputs X^, the groups before it already refined, gathered window by
        window. A plain group's forward stops at its leader (a pre-hook raises _Stop); the residual-writing
        Linear (`full`) keeps X^ and adds nothing, so the block returns r^ itself."""
        stats, got = _GroupStats(full, held), []
        if held:
            stats.orig_fit, stats.held.gram_x = self.orig_grams.pop(leader)  # one group's at a time
        linear = self.linears[leader]

        def stop(module, args):
            raise _Stop(args[0].detach().reshape(-1, args[0].shape[-1]))

        def silent(x):
            got.append(x.detach().reshape(-1, x.shape[-1]))
            return x.new_zeros(*x.shape[:-1], linear.out_features)

        if full:
            restore = _replace_forward(linear, silent)
        else:
            handle = linear.register_forward_pre_hook(stop)
        self.kept.clear()
        self.calls.clear()
        recorders = [] if full else [c.register_forward_hook(self._record(c), with_kwargs=True)
                                     for c in self.children if c not in self.replayed]
        try:
            for i in range(self.n_win):
                self.current[0] = i
                try:
                    out_h, xh = _block_out(self.block(self.park.get(self.hat.hidden[i]), **self.hat.kwargs[i])), None
                except _Stop as e:
                    xh = e.args[0]  # in the model's dtype: _GroupStats.add picks the precision
                if xh is not None:  # outside the except: the stopped block's frames are let go first
                    stats.add(i, xh, self.park.get(self.taken[leader][i]))
                elif full:
                    stats.add_residual(i, got.pop(), out_h.reshape(-1, out_h.shape[-1]),
                                       self.park.get(self.orig.hidden[i]))
                else:
                    raise DipSVDError(f"{leader} was not called on the compressed path; this block's "
                                      "structure is not supported by refine")
        finally:
            if full:
                restore()
            else:
                handle.remove()
            for h in recorders:
                h.remove()
        self._replay_finished()
        stats.check(leader)
        return stats

    def _replay_finished(self) -> None:
        """A child of the block that finished before this group's inputs were reached, once per window, holds only
        matrices already refined (or dense) and takes inputs no later group changes: its outputs are the same in
        every later run of the compressed path, so they are kept and replayed instead of running it again (the
        attention, for the gate/up and down groups of a Llama block)."""
        for child, ys in self.kept.items():
            if self.calls[child] == self.n_win and all(y is not None for y in ys):
                self.swaps.append(_replace_forward(child, _replay(ys, self.current, self.park)))
                self.replayed.add(child)
        self.kept.clear()

    def install(self, name: str, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) in the model's dtype on the host, with the refined forward now in place of the Linear's on the
        compressed path: its two factors, so the dense product is not computed there."""
        linear = self.linears[name]
        with weights_of(linear):
            dev, dt = linear.weight.device, linear.weight.dtype
            bias = None if linear.bias is None else linear.bias.detach().clone()
        host = (u.to("cpu", dt), None if v is None else v.to("cpu", dt))
        self.swaps.append(_replace_forward(linear, _low_rank(u.to(dev, dt), None if v is None else v.to(dev, dt),
                                                             bias)))
        return host

    def advance(self) -> None:
        """The refined block on the compressed path gives the next block its inputs (its finished children, the
        attention, replayed: what runs again is the rest, the MLP of a Llama block)."""
        for i in range(self.n_win):
            self.current[0] = i
            out = _block_out(self.block(self.park.get(self.hat.hidden[i]), **self.hat.kwargs[i]))
            self.hat.hidden[i] = self.park.put(out)

    def restore(self) -> None:
        for undo in reversed(self.swaps):
            undo()


class _Truncation:
    """Steps 2 and 3 for one input group: the method's whitened rank-k truncation of a target against a Gram (the
    fit part's G^, both parts', or the original inputs' for the unrefined baseline). The scaling (the whitening's eigendecomposition) is computed once per group (per matrix for a
    per-matrix scaling) and serves every candidate damping."""

    def __init__(self, gram: torch.Tensor, leader: str, members: list[str], spec: FactorSpec,
                 compute: torch.dtype, abs_means: dict | None, fisher_rows: dict | None):
        self.spec, self.leader, self.compute = spec, leader, compute
        self.data = ScaleData({n: leader for n in members}, {leader: gram}, abs_means, fisher_rows)
        self.cache: dict[str, tuple] = {}

    def __call__(self, name: str, target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rank == FULL:  # a dense matrix refitted, not truncated
            return target.to(DTYPES[self.spec.storage]), None
        scale = self.spec.scaling
        ident = name if scale.per_matrix else self.leader
        if ident not in self.cache:
            self.cache[ident] = scale.scale(self.spec, name, self.leader, self.data, self.compute) or (None, None, 0)
        S, S_inv, n = self.cache[ident]
        return factor_matrix(target, S, S_inv, n, DTYPES[self.spec.storage], self.compute).low_rank(rank)


def _numerators(stats: _Sums, full: bool, members: dict[str, nn.Linear], compute: torch.dtype) -> dict:
    """T per member: W C, or the residual-writing Linear's whole numerator (B - R^) X^^T; shared by every damping."""
    out = {}
    for n, linear in members.items():
        if full:  # the whole numerator, W C + (R - R^) X^^T, is at hand
            out[n] = stats.numerator.to(compute)
            continue
        with weights_of(linear):
            W = linear.weight.detach()
            out[n] = W.to(compute) @ stats.cross.to(compute, copy=False).to(W.device)
    return out


def _targets(stats: _Sums, numerators: dict, compute: torch.dtype, tau: float, priors: dict | None):
    """Step 1 at damping tau, per member: W*_tau = (T + delta W0) (G^ + delta I)^{-1}, T from _numerators,
    delta = tau x the mean eigenvalue of the part's G^, and W0 the prior: the unrefined rank-k matrix (ridge
    towards it: tau -> infinity gives back the unrefined factors) or, without priors, zero (the damped least
    squares). Yields (name, W*_tau, eigenvalues floored); one factorisation of G^ serves the whole group."""
    solve, floored = solver(stats.gram, compute, tau)
    delta = tau * float(stats.gram.diagonal().sum()) / stats.gram.shape[0]
    for n, T in numerators.items():
        if priors is not None and delta > 0:
            u0, v0 = priors[n]
            T = T + delta * _product(u0.to(T.device, compute), None if v0 is None else v0.to(T.device, compute))
        yield n, solve(T), floored


def _choose(stats: _GroupStats, leader: str, members: dict[str, nn.Linear], spec: FactorSpec, ranks: dict,
            compute: torch.dtype, taus: tuple, priors: dict | None, abs_means: dict | None,
            fisher_rows: dict | None) -> tuple[dict, int]:
    """3. The group's factors. Without held-out windows: the least-squares targets at the one damping taus[0]
    (step 1) and their whitened truncation (steps 2 and 3). With them, each member is chosen on the held-out
    windows, with every contender fitted on the fit windows alone: the refined factors at each damping in `taus`
    against the unrefined ones (W truncated against the original inputs' Gram of the fit windows). The winner
    is refitted on every window (the refined ones at their damping; the unrefined ones are `priors`, as the
    factor pass made them). Returns ({name: pick}, eigenvalues floored), a pick being {"final": (u, v),
    "fit": (u, v) of the winner fitted on the fit windows, "base": the fit windows' unrefined (u, v),
    "tau": the damping or None (unrefined), "gain": 1 - its held-out error / the unrefined one's}."""
    names = list(members)
    if not (stats.held.windows and priors is not None):
        floored, out = 0, {}
        truncate = _Truncation(stats.gram, leader, names, spec, compute, abs_means, fisher_rows)
        for n, target, floored in _targets(stats.fit, _numerators(stats.fit, stats.full, members, compute), compute,
                                           taus[0], priors):
            out[n] = {"final": truncate(n, target, ranks[n]), "tau": taus[0], "gain": None}
        return out, floored
    weights = {}
    for n, linear in members.items():
        with weights_of(linear):
            weights[n] = linear.weight.detach().clone()
    # a compensated dense matrix's unrefined form is itself
    priors = {n: (weights[n].float(), None) if ranks[n] == FULL else priors[n] for n in names}
    original = _Truncation(stats.orig_fit, leader, names, spec, compute, abs_means, fisher_rows)
    best = {}
    for n in names:
        base = original(n, weights[n], ranks[n])
        err = stats.held_error(None if stats.full else weights[n], *base, key=n)
        best[n] = {"fit": base, "base": base, "tau": None, "err": err, "base_err": err}
    del original  # its whitening, and the original inputs' Gram, are not read again: one g x g matrix each
    stats.orig_fit = None
    truncate = _Truncation(stats.gram, leader, names, spec, compute, abs_means, fisher_rows)
    fit_priors = {n: b["base"] for n, b in best.items()}  # the prior fitted on the same windows (no leak)
    numerators = _numerators(stats.fit, stats.full, members, compute)
    for tau in taus:
        for n, target, _ in _targets(stats.fit, numerators, compute, tau, fit_priors):
            uv = truncate(n, target, ranks[n])
            err = stats.held_error(None if stats.full else weights[n], *uv, key=n)
            if err < best[n]["err"]:
                best[n].update(fit=uv, tau=tau, err=err)
    del truncate, numerators
    return _refit(stats, leader, members, spec, ranks, compute, priors, abs_means, fisher_rows, best)


def _refit(stats: _GroupStats, leader: str, members: dict, spec: FactorSpec, ranks: dict, compute: torch.dtype,
           priors: dict, abs_means: dict | None, fisher_rows: dict | None, best: dict) -> tuple[dict, int]:
    """The chosen contenders refitted on every window: a refined member at its damping against both parts' G^,
    an unrefined one as its factors (`priors`)."""
    total, floored = stats.total(), 0
    truncate = _Truncation(total.gram, leader, list(members), spec, compute, abs_means, fisher_rows)
    refitted = {n: members[n] for n, b in best.items() if b["tau"] is not None}
    numerators = _numerators(total, stats.full, refitted, compute)
    for tau in {b["tau"] for b in best.values() if b["tau"] is not None}:
        chosen = {n: T for n, T in numerators.items() if best[n]["tau"] == tau}
        for n, target, floored in _targets(total, chosen, compute, tau, priors):
            best[n]["final"] = truncate(n, target, ranks[n])
    out = {}
    for n, b in best.items():
        gain = 1 - b["err"] / b["base_err"] if b["base_err"] > 0 else 0.0
        out[n] = {"final": b.get("final", priors[n]), "fit": b["fit"], "base": b["base"], "tau": b["tau"],
                  "gain": gain}
    return out, floored


def _held_error(reference: list, outputs: dict, held, park: _Park) -> float:
    return sum(float((park.get(reference[i]).double() - park.get(outputs[i]).double()).pow(2).sum()) for i in held)


def held_windows(n: int, every: int = None) -> frozenset:
    """The held-out windows of n: every HOLDOUT-th (the last of each run of HOLDOUT), at least one and never
    all; refine validates on them and fits on the rest."""
    every = every or HOLDOUT
    if n < 2:
        raise DipSVDError(f"refine fits on part of the calibration windows and checks the result on the rest, so "
                          f"it needs at least 2 windows (given {n}); raise --calib-windows")
    return frozenset(i for i in range(n) if is_held(i, every)) or frozenset({n - 1})


def _block_ranks(walk: "_BlockWalk", ranks: dict, compensate: Compensation, residual: bool) -> tuple[dict, str | None,
                                                                                                     list[str]]:
    """This block's ranks with the dense matrices `compensate` picks marked FULL, and its residual-writing Linear
    (a compensated dense one included); runs the original block (run_original), which groups the inputs."""
    dense = [n for n in walk.linears if ranks.get(n) is None]
    trial = {**ranks, **dict.fromkeys(dense, FULL)} if compensate.name != "none" else ranks
    last = walk.residual_writer(trial) if residual else None
    leaders = walk.run_original(last)
    marked = {**ranks, **{n: FULL for n in dense if compensate.picks(walk, n)}}
    return marked, (last if last is None or marked.get(last) is not None else None), leaders


def _as_parameters(out: dict) -> dict:
    """refine's result as compress_model takes it: a pair per factored matrix, a compensated dense matrix (u, None)
    as its weight's path and value, and a tuned parameter (already a path) as it is."""
    result = {}
    for n, w in out.items():
        if isinstance(w, tuple) and w[1] is None:
            result[f"{n}.weight"] = w[0]
        else:
            result[n] = w
    return result


@torch.no_grad()
def refine(model: nn.Module, names: list[str], windows: torch.Tensor, spec: FactorSpec, ranks: dict[str, int | None],
           abs_means: dict | None = None, fisher_rows: dict | None = None, progress=None,
           damp: float = DAMP, residual: bool = RESIDUAL, fallback: dict | None = None,
           taus: tuple = TAUS, tune: TuneConfig | None = None, compensate: str = "none") -> tuple[dict, dict]:
    """Refined (u, v) of every matrix that `ranks` factors, from one streaming pass over `windows`.
    Returns (weights, info) with info: seconds, the number of eigenvalues of G^ floored, and with `fallback`
    the held-out windows and, per block, what was refined and its held-out gain (`blocks`).

    Within a block the input groups are refined in the order the block calls them (q/k/v, o, gate/up,
    down for Llama): the compressed-path inputs of a group are taken with the groups before it already
    refined, since those are the inputs it will see in the compressed model. Each group's inputs are
    taken by a forward that stops at that group. `compensate` (COMPENSATIONS) also refits dense-kept matrices,
    which then come back as their weight's path and value (compress_model takes both).

    `fallback`: the unrefined (u, v) of every factored matrix. With it, refine never makes a block worse on
    text it did not fit: it fits on the calibration windows but the held-out ones (held_windows), chooses each
    matrix's damping among `taus` (ridge towards its unrefined factors) or the unrefined factors themselves by
    the held-out output error, and keeps a block unrefined where its refined output is not closer to the
    original block's on the held-out windows. With `tune` (a TuneConfig) as well, each block also tries the
    block-level training (_Contest.tune) and keeps it where it wins there. Without `fallback`, every window is
    fitted at the one damping `damp` towards zero (the plain closed form)."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    wanted, comp = set(names), COMPENSATIONS[compensate]
    compute = torch.float64 if spec.compute == "float64" else torch.float32
    held = held_windows(len(windows)) if fallback is not None else frozenset()
    taus = tuple(taus) if fallback is not None else (damp,)
    orig = capture_inputs(model, blocks, windows)
    park = _Park(orig.hidden[0].device)
    orig.hidden = [park.put(h) for h in orig.hidden]
    hat = BlockInputs(list(orig.hidden), orig.kwargs)  # identical until block 0 is compressed
    out, floored, report = {}, 0, []
    n_blocks = len(blocks)
    for b, block in enumerate(blocks):
        with block_on_device(block):  # sent once for the block's every pass over the windows
            walk = _BlockWalk(block, f"{prefix}.{b}" if prefix else str(b), wanted, orig, hat, park, held or None)
            block_ranks, last, leaders = _block_ranks(walk, ranks, comp, residual)
            chosen: dict[str, tuple] = {}
            try:
                for j, leader in enumerate(leaders):
                    members = [n for n in walk.linears
                               if walk.group_of.get(n) == leader and block_ranks.get(n) is not None]
                    if members:
                        stats = walk.compressed_inputs(leader, leader == last, held)
                        picks, k = _choose(stats, leader, {n: walk.linears[n] for n in members}, spec, block_ranks,
                                           compute, taus, fallback, abs_means, fisher_rows)
                        floored += k
                        for n in members:
                            installed = walk.install(n, *picks[n]["final"])
                            if block_ranks[n] != FULL or picks[n]["tau"] is not None:  # a dense one kept as is: not new
                                out[n] = installed
                            chosen[n] = picks[n]
                        del picks, stats
                    walk.taken.pop(leader, None)
                    if progress:
                        progress((b + (j + 1) / (len(leaders) + 1)) / n_blocks,
                                 f"block {b + 1}/{n_blocks}: refining {leader.rsplit('.', 1)[-1]}")
                inputs = list(hat.hidden)
                walk.advance()
                if held and chosen:
                    report.append(_keep_or_revert(walk, b, chosen, inputs, held, fallback, out, tune))
            finally:
                walk.restore()  # also when a group fails: the model is left as it came
        release_host_memory()
    if progress:
        progress(1.0, f"block {n_blocks}/{n_blocks}: refined")
    info = {"seconds": time.perf_counter() - t0, "floored": floored, "compensate": compensate}
    if held:
        info.update(held_windows=sorted(held), fit_windows=len(windows) - len(held), taus=list(taus), blocks=report)
    return _as_parameters(out), info


class _Contest:
    """The block-level check, on the held-out windows and from the same compressed-path inputs (`inputs`): each
    contender is the block with every factored matrix as one of the picks (`chosen`, from _choose), against the
    original block's output. The contenders are fitted on the fit windows alone; the winner is what the block
    ships (the closed-form ones refitted on every window)."""

    def __init__(self, walk: _BlockWalk, chosen: dict, inputs: list, held):
        self.walk, self.chosen, self.inputs, self.held = walk, chosen, inputs, held
        self.fit = [i for i in range(walk.n_win) if i not in held]

    def _put(self, weights: dict) -> None:
        self.walk.restore()
        self.walk.swaps, self.walk.replayed = [], set()
        for n, (u, v) in weights.items():
            self.walk.install(n, u, v)

    def _forward(self, i: int, extra: dict | None = None) -> torch.Tensor:
        """Window i through the block as installed, with the parameters in `extra` (block-local name -> tensor, in
        any dtype) in place of the block's own."""
        walk = self.walk
        args, kwargs = (walk.park.get(self.inputs[i]),), walk.hat.kwargs[i]
        if not extra:
            return _block_out(walk.block(*args, **kwargs))
        own = dict(walk.block.named_parameters())
        swapped = {k: t.to(own[k].dtype) for k, t in extra.items()}
        return _block_out(torch.func.functional_call(walk.block, swapped, args, kwargs, strict=False))

    def run(self, weights: dict, windows, extra: dict | None = None) -> dict:
        self._put(weights)
        return {i: self.walk.park.put(self._forward(i, extra)) for i in windows}

    def error(self, weights: dict, extra: dict | None = None) -> float:
        return _held_error(self.walk.orig.hidden, self.run(weights, self.held, extra), self.held, self.walk.park)

    def picks(self, which: str) -> dict:
        return {n: p[which] for n, p in self.chosen.items()}

    def _masters(self, start: dict, scope: str) -> tuple[dict, dict]:
        """float32 master copies of what block tuning trains: every pick's (u, v) (v None for a dense refit), put in
        place on the compressed path; with scope "block", also every other parameter of the block (its dense
        matrices, biases and norms) by block-local name, unless the block is offloaded."""
        walk = self.walk
        walk.restore()
        walk.swaps, walk.replayed = [], set()
        pairs = {}
        for n, (u, v) in start.items():
            with weights_of(walk.linears[n]):
                dev = walk.linears[n].weight.device
                bias = None if walk.linears[n].bias is None else walk.linears[n].bias.detach()
            pairs[n] = tuple(None if t is None else nn.Parameter(t.detach().to(dev, torch.float32).clone())
                             for t in (u, v))
            walk.swaps.append(_replace_forward(walk.linears[n], _low_rank(*pairs[n], bias)))
        extra = {}
        if scope == "block" and not any(offload_hooks(m) for m in walk.block.modules()):
            skip = {f"{n[len(walk.base) + 1:]}.{k}" for n in start for k in ("weight", "bias")}
            extra = {k: nn.Parameter(t.detach().float().clone()) for k, t in walk.block.named_parameters()
                     if k not in skip}
        return pairs, extra

    def tune(self, start: dict, windows: list, cfg: "TuneConfig") -> tuple[dict, dict]:
        """Block-level training (the second stage of AA-SVD, arXiv 2604.02119) from `start`: AdamW with a warm-up
        and cosine decay, gradients clipped, over `windows` (shuffled each epoch, seeded) for cfg.epochs; the loss
        is the mean squared distance between the original block's output and the block's output on the
        compressed-path inputs. Returns the tuned pairs (float32) and, with scope "block", the block's other
        tuned parameters by block-local name."""
        pairs, extra = self._masters(start, cfg.scope)
        params = [t for uv in pairs.values() for t in uv if t is not None] + list(extra.values())
        frozen = [p for p in self.walk.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        order, total, step = torch.Generator().manual_seed(0), cfg.epochs * len(windows), 0
        try:
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    for k in torch.randperm(len(windows), generator=order).tolist():
                        for group in opt.param_groups:
                            group["lr"] = cfg.lr * lr_scale(step, total, cfg.warmup)
                        out = self._forward(windows[k], extra).float()
                        loss = (out - self.walk.park.get(self.walk.orig.hidden[windows[k]]).float()).pow(2).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.clip > 0:
                            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                        opt.step()
                        step += 1
        finally:
            for p in frozen:
                p.requires_grad_(True)
        tuned = {n: tuple(None if t is None else t.detach() for t in uv) for n, uv in pairs.items()}
        return tuned, {k: t.detach() for k, t in extra.items()}


def _keep_or_revert(walk: _BlockWalk, b: int, chosen: dict, inputs: list, held, fallback: dict, out: dict,
                    tune: TuneConfig | None = None) -> dict:
    """The block-level check (_Contest): the refined block against the unrefined one (and, with `tune`, the
    refined one trained by _Contest.tune on the fit windows), all fitted on the fit windows and scored on the
    held-out ones. Where the refined block is not the closest to the original, the block ships the winner: its
    unrefined factors (`fallback`; a compensated dense matrix goes back to the original's), or the tuned block as
    trained on the fit windows (what the held-out windows scored), whose outputs give the next block its inputs
    (walk.hat, which holds the refined block's outputs). Returns the block's line of the report."""
    contest = _Contest(walk, chosen, inputs, held)
    errors = {"refined": contest.error(contest.picks("fit")), "unrefined": contest.error(contest.picks("base"))}
    tuned = extra = None
    if tune is not None:
        tuned, extra = contest.tune(contest.picks("fit"), contest.fit, tune)
        errors["tuned"] = contest.error(tuned, extra)
    winner = min(errors, key=lambda k: (errors[k], k != "unrefined"))  # a tie keeps the block unrefined
    if winner != "refined":
        base = contest.picks("base")
        final = tuned if winner == "tuned" else {n: base[n] if base[n][1] is None else fallback[n] for n in chosen}
        extra = extra if winner == "tuned" else {}
        outputs = contest.run(final, range(walk.n_win), extra)
        for n, (u, v) in final.items():
            with weights_of(walk.linears[n]):
                dt = walk.linears[n].weight.dtype
            out[n] = (u.to("cpu", dt), None if v is None else v.to("cpu", dt))
            if v is None and winner == "unrefined":
                out.pop(n)  # a compensated dense matrix back to the original's: nothing new to ship
        own = dict(walk.block.named_parameters())
        out.update({f"{walk.base}.{k}": t.to("cpu", own[k].dtype) for k, t in extra.items()})
        for i in range(walk.n_win):
            walk.hat.hidden[i] = outputs[i]
    matrices = {n: {"tau": p["tau"], "gain": p["gain"], "dense": p["fit"][1] is None} for n, p in chosen.items()}
    best = min(errors["refined"], errors.get("tuned", float("inf")))
    return {"block": b, "refined": winner != "unrefined", "choice": winner,
            "gain": 1 - best / errors["unrefined"] if errors["unrefined"] > 0 else 0.0,
            "errors": errors, "matrices": matrices}


def summary(info: dict) -> str:
    """The refine report in one line: how many blocks were refined, their held-out gain, which kept unrefined."""
    blocks = info.get("blocks")
    if not blocks:
        return f"refined every factored matrix ({info['seconds']:.1f} s)"
    kept = [r for r in blocks if r["refined"]]
    gains = sorted(r["gain"] for r in kept)
    median = gains[len(gains) // 2] if gains else 0.0
    back = [str(r["block"]) for r in blocks if not r["refined"]]
    tuned = sum(r.get("choice") == "tuned" for r in blocks)
    dense = sum(m.get("dense", False) and m["tau"] is not None for r in kept for m in r["matrices"].values())
    return (f"refined {len(kept)} of {len(blocks)} blocks" + (f", {tuned} of them tuned" if tuned else "")
            + (f", {dense} dense matrices refitted" if dense else "")
            + f" (median held-out gain {100 * median:+.0f}%: block-output error that much below unrefined, "
            f"{len(info['held_windows'])} of {len(info['held_windows']) + info['fit_windows']} windows "
            f"held out)" + (f"; kept unrefined: blocks {', '.join(back)}" if back else "")
            + f" ({info['seconds']:.1f} s)")


def refine_table(info: dict) -> list[dict]:
    """The per-block report as rows for a table: block, refined or kept unrefined, its held-out gain, and per
    matrix type its damping (or "unrefined") and gain."""
    rows = []
    for b in info.get("blocks", []):
        row = {"block": b["block"], "refined": "yes" if b["refined"] else "kept unrefined",
               "block gain": f"{100 * b['gain']:+.1f}%"}
        for name, m in b["matrices"].items():
            short = name.rsplit(".", 1)[-1]
            kept = "dense, as it was" if m.get("dense") else "unrefined"
            row[short] = kept if m["tau"] is None else (("dense, refitted " if m.get("dense") else "")
                                                        + f"{100 * m['gain']:+.0f}% (damping {m['tau']:g})")
        rows.append(row)
    return rows


ADVISED_CALIBRATION = (DEFAULT_WINDOWS, DEFAULT_SEQLEN)  # windows x tokens from which refine is measured to pay
SCALED_PASSES = ("statistics", "fisher", "refine")  # the passes whose time grows with the calibration tokens
CACHED_BELOW_S = 0.5  # a pass under this was read from the cache, or too small to scale from: not timed


def calibration_advice(windows: int, seqlen: int, timings: dict | None = None) -> str | None:
    """What the app says when the calibration is small for a refined build (None when it is not): what refine
    fits on, and what the advised calibration would cost, from the passes' seconds measured at this size."""
    tokens, (w, t) = windows * seqlen, ADVISED_CALIBRATION
    if tokens >= w * t:
        return None
    factor = w * t / tokens
    held = len(held_windows(windows)) if windows >= 2 else 0
    return (f"The calibration ({windows} x {seqlen} = {tokens:,} tokens) is small for a refined build: refine fits on "
            f"{windows - held} windows and checks each block on {held} held out, and at this size it keeps fewer "
            f"blocks refined and gains less than at {w} x {t} (measured on the bundled model). Loading "
            f"{w} windows of {t} tokens (Model and data page) multiplies the time of the statistics, Fisher and "
            f"refine passes by about {factor:.0f}{_scaled_cost(timings or {}, factor)}.")


def _scaled_cost(timings: dict, factor: float) -> str:
    """calibration_advice's cost at the advised size, from the passes timed here (those under CACHED_BELOW_S were
    read from the cache or too small to scale from: said so, never counted as 0 s)."""
    timed = {k: timings[k] for k in SCALED_PASSES if k in timings}
    measured = {k: v for k, v in timed.items() if v >= CACHED_BELOW_S}
    cached = [k for k in timed if k not in measured]
    from_cache = f"{', '.join(cached)} under {CACHED_BELOW_S:g} s here: read from the cache or too small to time" \
        if cached else ""
    if not measured:
        return f" ({from_cache})" if from_cache else ""
    total = sum(measured.values())
    return (f": about {total * factor:.0f} s for {', '.join(measured)}, timed here at {total:.0f} s"
            + (f" ({from_cache})" if from_cache else ""))
