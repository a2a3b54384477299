"""Dobi-SVD in the flow (arXiv 2502.02723): a second way from model + text to a compressed model.

Dobi-SVD truncates activations, not weights, and learns where:
A. train: a forward hook on every targeted Linear replaces its output a = x W^T by the masked
   SVD a' = U diag(S t(gamma)) V^T (dobi_math.masked_svd, stabilised backward); only the gammas
   learn, with Adam, on next-token loss + lam * |ratio(gamma) - target|. The model is not modified.
B. ranks: k_m = floor(gamma_m); one common scale on all gammas then meets the budget exactly.
C. weights: V_k, the top-k right singular vectors of the layer's activations over the calibration
   windows (all of them by default, as the whitening methods use), from incremental PCA one window
   at a time (bounded memory); W' = V_k (V_k^T W), stored as
   u = V_k (out, k) and v = V_k^T W (k, in), bias on u.
   Note: with exact PCA on the same windows this is the rank-k matrix that minimises
   ||(W - W') X||_F, i.e. SVD-LLM's whitened truncation; the tests check that equality.
D. remap (optional): u and v are stored in int8 with one absmax scale per rank vector, so a rank
   costs k (out + in) + 8k bytes and ranks up to about min(out, in) fit the budget.

Budgets are counted in bytes against the 16-bit dense matrices (Dobi-SVD's convention). Without
remap that is exactly the parameter ratio every other method uses.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..allocation.budget import DENSE, Allocation, check_ratio
from ..common.errors import DipSVDError
from ..common.knobs import Widget, knob
from ..lowrank.surgery import LowRankLinear
from ..model.blocks import Target
from .dobi_math import (IncrementalPCA, dense_storage_bytes, dequantize_absmax, lowrank_storage_bytes, masked_svd,
                        max_remap_rank, quantize_absmax)

DENSE_BYTES = 2  # the 16-bit dense model that storage is counted against


@dataclass(frozen=True)
class DobiConfig:
    """Dobi-SVD's own options (settings.dobi, registered with its handler); each field's knob gives its flag, help
    and widget."""

    epochs: int = knob(2, "passes over the training windows", "--dobi-epochs", "positive",
                       widget=Widget("Epochs", 1, 50, 1))
    # Adam step on gamma / (its largest factored rank + 1), decayed linearly to lr / 10
    lr: float = knob(0.02, "Adam step on each truncation position, as a share of its largest rank", "--dobi-lr",
                     widget=Widget("Learning rate (share of a matrix's rank range)", 0.001, 0.5, 0.005, "%.3f"))
    lam: float = knob(100.0, "weight of |ratio - target| in the loss", "--dobi-lambda",
                      widget=Widget("λ (weight of |ratio − target|)", 0.0, 100000.0, 10.0))
    windows: int = knob(4, "calibration windows for training (the first of --calib-windows; the IPCA weight update "
                           "uses all of them)", "--dobi-windows", "positive", widget=Widget("Training windows", 1, 256, 1))
    ipca_windows: int | None = knob(None, "calibration windows for the IPCA weight update (default: all "
                                          "--calib-windows)", "--dobi-ipca-windows", "positive")
    beta: float = knob(10.0, "sharpness of the tanh truncation mask", "--dobi-beta",
                       widget=Widget("β of the tanh mask", 0.5, 100.0, 0.5))
    remap: bool = knob(False, "store the factors in 8 bits (ratio then counted in bytes against 16-bit weights)",
                       "--remap", widget=Widget("Remap: 8-bit factors (ratio counted in bytes against 16-bit weights)"))
    # components IPCA keeps beyond the rank (more = closer to exact PCA, slower)
    ipca_extra: int = knob(64, "components the IPCA keeps beyond the rank", cli=False)
    # hold the budget by projection, not by lam alone (ours; see train_gammas)
    project: bool = knob(True, "hold the budget by projection, not by lambda alone", cli=False)

    def check(self) -> "DobiConfig":
        if self.ipca_windows is not None and self.ipca_windows < 1:
            raise DipSVDError(f"Dobi-SVD needs ipca_windows >= 1, or None for all calibration windows "
                              f"(got {self.ipca_windows})")
        if self.epochs < 1 or self.windows < 1:
            raise DipSVDError(f"Dobi-SVD needs epochs >= 1 and windows >= 1 (got {self.epochs}, {self.windows})")
        if not (self.lr > 0 and self.lam >= 0 and self.beta > 0 and self.ipca_extra >= 0):
            raise DipSVDError("Dobi-SVD needs lr > 0, lambda >= 0, beta > 0 and ipca_extra >= 0")
        return self


# --- storage: what a rank costs, in bytes ---
def rank_cost(t: Target, remap: bool) -> int:
    return lowrank_storage_bytes(1, t.out_features, t.in_features, remap, DENSE_BYTES)


def dense_cost(t: Target) -> int:
    return dense_storage_bytes(t.out_features, t.in_features, DENSE_BYTES)


def max_factored_rank(t: Target, remap: bool) -> int:
    """The largest rank worth factoring. Without remap: the last rank cheaper than the dense matrix
    (rank max + 1 means "keep dense"). With remap: the largest rank whose 8-bit factors fit the 16-bit
    dense bytes, min(out, in) but for square matrices, whose scales cost a few ranks; a remapped
    matrix is never kept dense."""
    if remap:
        return max_remap_rank(t.out_features, t.in_features, DENSE_BYTES)
    return math.ceil(t.params / (t.out_features + t.in_features)) - 1


def gamma_cap(t: Target, remap: bool) -> int:
    """The largest meaningful floor(gamma): one past the factored ranks (= dense) without remap."""
    return max_factored_rank(t, remap) + (0 if remap else 1)


def matrix_bytes(k: int | None, t: Target, remap: bool) -> int:
    return dense_cost(t) if k is DENSE else lowrank_storage_bytes(k, t.out_features, t.in_features, remap, DENSE_BYTES)


def storage_ratio(ranks: dict[str, int | None], targets: list[Target], remap: bool) -> float:
    """Fraction of the targeted 16-bit bytes removed."""
    return storage_report(ranks, targets, remap)["storage_ratio"]


def ranks_from_gammas(gammas: dict[str, float], targets: list[Target], remap: bool,
                      scale: float = 1.0) -> dict[str, int | None]:
    ranks = {}
    for t in targets:
        k = int(min(max(1.0, math.floor(scale * gammas[t.name])), gamma_cap(t, remap)))
        ranks[t.name] = DENSE if k > max_factored_rank(t, remap) else k
    return ranks


def meet_budget(gammas: dict[str, float], targets: list[Target], ratio: float, remap: bool) -> dict:
    """The ranks of c * gamma for the largest common c whose bytes fit the budget (bisection)."""
    def fits(c):
        return storage_ratio(ranks_from_gammas(gammas, targets, remap, c), targets, remap) >= ratio

    if not fits(0.0):
        raise DipSVDError(f"ratio {ratio:g} cannot be met even at rank 1 everywhere; lower the ratio")
    lo, hi = 0.0, 1.0
    while fits(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    ranks = ranks_from_gammas(gammas, targets, remap, lo)
    # Flooring leaves budget unspent (a lot on small models): give it back one rank at a time,
    # largest rounding remainder first, as the projector does for the other methods.
    left = (1 - ratio) * sum(dense_cost(t) for t in targets) - sum(matrix_bytes(ranks[t.name], t, remap) for t in targets)
    order = sorted(targets, key=lambda t: -((lo * gammas[t.name]) % 1))
    grew = True
    while grew:
        grew = False
        for t in order:
            k = ranks[t.name]
            if k is not DENSE and k < max_factored_rank(t, remap) and rank_cost(t, remap) <= left:
                ranks[t.name], left, grew = k + 1, left - rank_cost(t, remap), True
    return ranks


def budget_note(targets: list[Target], ratio: float, remap: bool) -> str | None:
    """A sentence when the budget cannot be spent: with remap, full-rank 8-bit factors of a non-square
    matrix take less than its 16-bit bytes, so small ratios remove more than asked."""
    full = {t.name: gamma_cap(t, remap) for t in targets}
    least = storage_ratio(ranks_from_gammas(full, targets, remap), targets, remap)
    if least > ratio + 0.005:
        return (f"ratio {ratio:g} cannot be spent: even at full rank the 8-bit factors remove {least:.3f} of the "
                f"16-bit bytes, so the model is smaller than asked; compare it with the other methods at {least:.2f}")
    return None


def uniform_gammas(targets: list[Target], ratio: float, remap: bool) -> dict[str, float]:
    """Start: every matrix keeps (1 - ratio) of its bytes; gamma = k + 0.5 so floor(gamma) = k."""
    return {t.name: min(math.floor((1 - ratio) * dense_cost(t) / rank_cost(t, remap)), gamma_cap(t, remap)) + 0.5
            for t in targets}


def gamma_shift(gammas: dict[str, float], targets: list[Target], ratio: float, remap: bool) -> dict:
    """How far training moved the truncation positions from the uniform start, in ranks."""
    start = uniform_gammas(targets, ratio, remap)
    moves = np.array([gammas[t.name] - start[t.name] for t in targets])
    return {"max_abs": float(np.abs(moves).max()), "mean_abs": float(np.abs(moves).mean()),
            "min": float(moves.min()), "max": float(moves.max())}


# --- A. training ---
@dataclass
class Trained:
    gammas: dict[str, float]
    history: list[dict] = field(default_factory=list)  # per step: loss, task, ratio
    seconds: float = 0.0
    cancelled: bool = False


def _soft_ratio(gammas: dict[str, torch.Tensor], targets: list[Target], remap: bool) -> torch.Tensor:
    """ratio(gamma) = 1 - sum kept_m / sum D_m with kept_m = min((gamma - 1/2) c_m, D_m) (the min only
    matters without remap, where the rank past the factored ones is the dense matrix).

    gamma - 1/2 is the expected value of the rank floor(gamma) that is finally kept.
    """
    kept = sum(torch.clamp_max((gammas[t.name] - 0.5) * rank_cost(t, remap), float(dense_cost(t))) for t in targets)
    return 1 - kept / sum(dense_cost(t) for t in targets)


def train_gammas(model: torch.nn.Module, targets: list[Target], windows: torch.Tensor, ratio: float,
                 cfg: DobiConfig, progress=None, callback=None, cancel=None) -> Trained:
    """Learn one truncation position per targeted Linear. `windows` is (n, seqlen) token ids, one
    window per step. `callback(step, record)` sees every step (return False to stop); `cancel` is a
    threading.Event. The model's own parameters are frozen for the run and restored after.

    With cfg.project (the default, ours) the budget is held by projection, so lam has no effect:
    the gradient is projected onto the budget plane before each Adam step (_project_gradient), and
    the step ends with one common shift of all gammas (as a share of their range) that puts the soft
    ratio back on the target. The paper relies on the lam * |ratio - target| term alone (project=False);
    measured on SmolLM2-135M with few CPU steps, the task gradient outweighs it (lam = 100 let the
    ratio drift from 0.20 to 0.18 in one step), so the budget is then met only by the fix-up after
    training, which rescales what was learned."""
    ratio, cfg = check_ratio(ratio), cfg.check()
    device = next(model.parameters()).device
    # Each gamma is learned as a fraction g of its cap (gamma_cap), so one
    # learning rate moves a 64-wide and a 4096-wide matrix by the same share of their range.
    cap = {t.name: float(gamma_cap(t, cfg.remap)) for t in targets}
    start = uniform_gammas(targets, ratio, cfg.remap)
    frac = {n: torch.tensor(g / cap[n], dtype=torch.float32, device=device, requires_grad=True) for n, g in start.items()}
    gammas: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(mod, args, out):
            a = out if mod.bias is None else out - mod.bias
            A = a.reshape(-1, a.shape[-1]).float()
            A2 = masked_svd(A, gammas[name], cfg.beta).to(out.dtype).reshape(out.shape)
            return A2 if mod.bias is None else A2 + mod.bias
        return fn

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    opt = torch.optim.Adam(list(frac.values()), lr=cfg.lr)
    handles = [mods[t.name].register_forward_hook(hook(t.name)) for t in targets]
    out = Trained({})
    t0 = time.perf_counter()
    steps = cfg.epochs * len(windows)
    try:
        for step in range(steps):
            if cancel is not None and cancel.is_set():
                out.cancelled = True
                break
            w = windows[step % len(windows)].unsqueeze(0).to(device)
            for g in opt.param_groups:  # linear decay to lr / 10 lets the ratio settle on its target
                g["lr"] = cfg.lr * (1 - 0.9 * step / max(steps - 1, 1))
            gammas.update({n: f * cap[n] for n, f in frac.items()})
            task = model(input_ids=w, labels=w).loss
            if not torch.isfinite(task):
                raise DipSVDError(f"Dobi-SVD training loss is not finite at step {step + 1}; lower --dobi-lr "
                                  "or load the model in float32")
            soft = _soft_ratio(gammas, targets, cfg.remap)
            loss = task + cfg.lam * (soft - ratio).abs()
            opt.zero_grad()
            loss.backward()
            if cfg.project:
                _project_gradient(frac, cap, targets, cfg.remap)
            opt.step()
            with torch.no_grad():
                for n, f in frac.items():
                    f.clamp_(1.0 / cap[n], 1.0 + 0.5 / cap[n])
                if cfg.project:
                    _project(frac, cap, targets, ratio, cfg.remap)
            record = {"step": step + 1, "loss": loss.item(), "task": task.item(), "ratio": soft.item()}
            out.history.append(record)
            if progress:
                progress((step + 1) / steps, f"dobi training: step {step + 1}/{steps}, loss {record['task']:.3f}")
            if callback is not None and callback(step + 1, record) is False:
                out.cancelled = True
                break
    except torch.OutOfMemoryError:
        raise DipSVDError("out of memory in Dobi-SVD training; use a shorter --seqlen or the CPU") from None
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    out.gammas = {n: float(f.detach()) * cap[n] for n, f in frac.items()}
    out.seconds = time.perf_counter() - t0
    return out


def _project_gradient(frac: dict[str, torch.Tensor], cap: dict[str, float], targets: list[Target],
                      remap: bool) -> None:
    """In place: remove from the gradient its component along the budget's normal a_m = d kept / d frac_m.

    What is left moves bytes from matrices whose loss gradient is below the average to those above
    it, at constant total size. Without this, Adam's per-parameter normalisation turns a gradient
    that says "every matrix wants more rank" into the same step for all, which the budget shift then
    undoes: on SmolLM2-135M every gamma moved less than 0.2 ranks in 8 steps.
    """
    a = {t.name: cap[t.name] * rank_cost(t, remap) for t in targets
         if frac[t.name].grad is not None and (frac[t.name] - 0.5 / cap[t.name]) * cap[t.name] * rank_cost(t, remap)
         < dense_cost(t)}  # matrices past the dense break-even have no budget gradient
    if not a:
        return
    dot = sum(float(frac[n].grad) * v for n, v in a.items())
    mu = dot / sum(v * v for v in a.values())
    for n, v in a.items():
        frac[n].grad -= mu * v


def _project(frac: dict[str, torch.Tensor], cap: dict[str, float], targets: list[Target], ratio: float,
             remap: bool) -> None:
    """In place: frac += delta (then clamped) with the delta that makes the soft ratio equal the target."""
    base = {n: f.clone() for n, f in frac.items()}
    lo_cap = {n: 1.0 / c for n, c in cap.items()}
    hi_cap = {n: 1.0 + 0.5 / c for n, c in cap.items()}

    def at(delta):
        return {n: ((base[n] + delta).clamp(lo_cap[n], hi_cap[n])) * cap[n] for n in base}

    lo, hi = -1.0, 1.0  # the soft ratio falls as delta rises
    if float(_soft_ratio(at(hi), targets, remap)) > ratio or float(_soft_ratio(at(lo), targets, remap)) < ratio:
        return  # the target is out of reach of a shift; the penalty and the final fix-up handle it
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(_soft_ratio(at(mid), targets, remap)) > ratio else (lo, mid)
    for n, f in frac.items():
        f.copy_((base[n] + lo).clamp(lo_cap[n], hi_cap[n]))


# --- C. weight update by incremental PCA ---
def ipca_weights(model: torch.nn.Module, targets: list[Target], windows: torch.Tensor,
                 ranks: dict[str, int | None], extra: int = 64, progress=None) -> dict[str, tuple]:
    """name -> (u, v) with u = V_k (out, k), v = V_k^T W (k, in), V_k from incremental PCA of the
    layer's activations x W^T (bias left out), one window per chunk. Dense matrices are left out.

    The windows stream one decoder block at a time (stream.py): a block runs over every window before the next,
    so only that block's PCA states exist at once (float64, (k + extra) x out each), and each of its matrices
    gets its (u, v) when the block is done; besides them, the activations between blocks (windows x seqlen x
    hidden) are held. Each matrix sees the same chunks in the same order as in whole-model passes."""
    from ..engine.stream import capture_inputs, forward_block
    from ..model.offload import block_on_device
    from ..model.blocks import find_blocks

    _, blocks = find_blocks(model)
    mods = dict(model.named_modules())
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if ranks[t.name] is not DENSE:
            by_block.setdefault(t.block, []).append(t)
    weights = {}
    with torch.no_grad():
        inputs = capture_inputs(model, blocks, windows)
        for b, block in enumerate(blocks):
            if b > max(by_block, default=-1):
                break  # no block above holds a factored matrix
            with block_on_device(block):  # sent once for the windows and the factors
                pcas = {t.name: IncrementalPCA(t.out_features, min(t.out_features, ranks[t.name] + extra))
                        for t in by_block.get(b, [])}
                handles = [mods[n].register_forward_hook(_ipca_hook(pca)) for n, pca in pcas.items()]
                try:
                    forward_block(block, inputs, progress=lambda i, m, b=b: progress and progress(
                        (b + i / m) / len(blocks), f"dobi weight update: block {b + 1}/{len(blocks)}, window {i}/{m}"))
                finally:
                    for h in handles:
                        h.remove()
                for n, pca in pcas.items():
                    weights[n] = _pca_factors(n, pca, ranks[n], mods[n])
    return weights


def _ipca_hook(pca: IncrementalPCA):
    def fn(mod, args, out):
        a = out if mod.bias is None else out - mod.bias
        pca.partial_fit(a.reshape(-1, a.shape[-1]).detach())
    return fn


def _pca_factors(name: str, pca: IncrementalPCA, k: int, linear: torch.nn.Module) -> tuple:
    """(V_k, V_k^T W) in float32 from a finished PCA of the Linear's outputs."""
    from ..model.offload import weights_of

    if pca.components.shape[0] < k:
        raise DipSVDError(f"{name}: rank {k} needs at least {k} activation rows, the IPCA saw {pca.n_seen}; "
                          "use more --dobi-windows or a longer --seqlen")
    V = pca.components[:k].T  # (out, k), float64
    with weights_of(linear):
        W = linear.weight.detach().double()
        return V.float().contiguous(), (V.T.to(W.device) @ W).float().contiguous()


# --- D. remapping ---
def remap_weights(weights: dict[str, tuple]) -> dict[str, tuple]:
    """The (u, v) pairs after an int8 round trip: what a remapped model stores and runs with."""
    return {n: (dequantize_absmax(*quantize_absmax(u, 0), 0), dequantize_absmax(*quantize_absmax(v, 1), 1))
            for n, (u, v) in weights.items()}


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The int8 form of every LowRankLinear's u and v (`.weight` int8 plus `.weight_scale`).
    Re-quantising remap_weights' output gives back its int8 values: each vector's absmax is 127
    times its scale (up to float rounding of that scale)."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            for part, dim in (("u", 0), ("v", 1)):
                q, s = quantize_absmax(getattr(m, part).weight, dim)
                state[f"{name}.{part}.weight"], state[f"{name}.{part}.weight_scale"] = q, s
    return state


def storage_report(ranks: dict[str, int | None], targets: list[Target], remap: bool) -> dict:
    before = sum(dense_cost(t) for t in targets)
    after = sum(matrix_bytes(ranks[t.name], t, remap) for t in targets)
    return {"targeted_bytes_before_16bit": before, "targeted_bytes_after": after,
            "storage_ratio": 1 - after / before, "remap": remap}


def allocation_of(ranks: dict[str, int | None], targets: list[Target], ratio: float, remap: bool,
                  history: list[float]) -> Allocation:
    """An Allocation for reports and the app: p_l = the share of block l's 16-bit bytes kept."""
    n = 1 + max(t.block for t in targets)
    kept, total = [0.0] * n, [0.0] * n
    for t in targets:
        kept[t.block] += matrix_bytes(ranks[t.name], t, remap)
        total[t.block] += dense_cost(t)
    p = np.array([k / d for k, d in zip(kept, total)])
    return Allocation(p, ranks, ratio, storage_ratio(ranks, targets, remap), "trained", history=list(history))


def config_dict(cfg: DobiConfig) -> dict:
    return asdict(cfg)
