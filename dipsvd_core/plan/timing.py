"""The time model of a plan: a microbenchmark of one block and of the whitening's factorisations on the run's own
device (Rates), scaled to every phase by its work (timing)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation.strategies import strategy
from ..engine import passes as P
from ..lowrank.scalings import symmetric_eigh
from ..methods.handlers import handler
from ..refine.choices import TAUS, refine_choice
from .shapes import DTYPE_BYTES, Phase, Run, Shapes, probe_groups_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device, repeat: int = 2) -> float:
    fn()  # warm-up
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class Rates:
    block_window_s: float  # one decoder block over one window of seqlen, with the statistics hooks
    block_forward_s: float  # the same without hooks (evaluation, Fisher)
    svd_512_s: float  # SVD of a 512 x 512 matrix in the compute dtype
    eigh_512_s: float
    matmul_flops: float  # float32 or compute-dtype matmul rate (flop/s)
    copy_bytes_s: float  # host memory copy rate


def microbenchmark(config, sh: Shapes, run: Run, device: torch.device) -> Rates:
    """A few seconds on the device: one real-width decoder block over one window, plus small SVDs."""
    from transformers import AutoModelForCausalLM

    from ..engine.stats import BlockStats
    from ..engine.stream import capture_inputs, forward_block
    from ..model.blocks import find_blocks
    from ..model.models import DTYPES

    cfg = config.__class__.from_dict(config.to_dict())
    cfg.num_hidden_layers, cfg.vocab_size = 1, min(sh.vocab, 1024)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= cfg.vocab_size:
            setattr(cfg, k, 0)
    for k in ("layer_types",):  # per-layer lists must match the one layer
        if isinstance(getattr(cfg, k, None), list):
            setattr(cfg, k, getattr(cfg, k)[:1])
    dtype = DTYPES[run.dtype]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    _, blocks = find_blocks(model)
    linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    windows = torch.randint(0, cfg.vocab_size, (1, run.seqlen))
    inputs = capture_inputs(model, blocks, windows)
    x0 = inputs.hidden[0]

    def block_pass():
        inputs.hidden[0] = x0
        st = BlockStats(linears)
        handles = st.attach()
        try:
            forward_block(blocks[0], inputs, st.add_output)
        finally:
            for h in handles:
                h.remove()

    block_s = _best(block_pass, device)

    def plain():
        inputs.hidden[0] = x0
        forward_block(blocks[0], inputs)

    plain_s = _best(plain, device)
    del model
    cdt = DTYPES.get(run.compute_dtype, torch.float64)
    a = torch.randn(512, 512, device=device, dtype=cdt)
    svd_s = _best(lambda: torch.linalg.svd(a, full_matrices=False), device)
    g = a @ a.T
    eigh_s = _best(lambda: symmetric_eigh(g), device)  # where the engine runs it (scalings.eigh_on_host)
    m = torch.randn(1024, 1024, device=device, dtype=cdt)
    mm_s = _best(lambda: m @ m, device)
    host = torch.empty(64 << 20, dtype=torch.uint8)
    copy_s = _best(lambda: host.clone(), torch.device("cpu"))
    return Rates(block_s, plain_s, svd_s, eigh_s, 2 * 1024**3 / mm_s, (64 << 20) / copy_s)


def _whitening_seconds(run: Run, g: int, r: Rates) -> float:
    """One input group's whitening (g x g), as the method's scaling computes it (scalings.py)."""
    cost = getattr(handler(run.method), "scaling", None)
    cost = cost.plan_cost(run.spec) if cost is not None else None
    if cost is None:
        return 0.0
    unit = (g / 512) ** 3
    if run.compute_dtype == "float32":
        return unit * (r.svd_512_s if cost.svd_in_float32 else r.eigh_512_s)
    if cost.cholesky:  # scalings.cholesky_root: the factor alone (g^3 / 3 products); its inverse is never formed
        return g**3 / 3 / r.matmul_flops
    return unit * r.eigh_512_s + cost.products * g**3 / r.matmul_flops


def timing(phases: dict[str, Phase], sh: Shapes, run: Run, r: Rates) -> None:
    """Seconds of every phase from the microbenchmark's rates."""
    L, N = sh.n_blocks, run.calib_windows
    cost = lambda o, i: o * i * min(o, i) / 512**3  # noqa: E731  (SVD cost, in 512^3 units)
    per_block = [(o, i) for b, o, i in sh.matrices if b == 0]
    forward = L * N * r.block_window_s
    whiten = sum(_whitening_seconds(run, g, r) for g in sh.groups)
    if run.compute_dtype == "float32":  # factors.factor_matrix: the SVDs themselves
        factor = sum(cost(o, i) * r.svd_512_s + 4 * o * i * i / r.matmul_flops for o, i in per_block)
    else:  # float64: eigendecompositions of the smaller of A A^T and A^T A (A = W S)
        factor = sum(cost(min(o, i), min(o, i)) * r.eigh_512_s + 2 * o * i * (i + 2 * min(o, i)) / r.matmul_flops
                     for o, i in per_block)
    eval_windows = run.eval_sets * math.ceil(run.eval_tokens / run.seqlen)
    lm_head = 2 * run.seqlen * sh.hidden * sh.vocab / r.matmul_flops
    fwd_model = L * r.block_forward_s + lm_head  # one window through the model
    phases["load"].seconds = sh.params * DTYPE_BYTES[run.dtype] / r.copy_bytes_s
    phases[P.STATISTICS].seconds = forward + L * cost(sh.hidden, sh.hidden) * r.eigh_512_s
    phases["factors"].seconds = L * (whiten + factor)
    phases["fisher"].seconds = 3 * N * fwd_model
    # refine: the original block, the compressed block up to each input group with the finished attention
    # replayed (about 2.5 block forwards a window, measured on the bundled model), every group's G^ and C (the
    # last group, the residual-writing Linear: G^ and the H x g numerator) and the original inputs' X X^T, three
    # whitenings per group (the original inputs' on the fit windows, G^ on the fit windows, G^ on every window),
    # a factoring per candidate damping (refine.TAUS), one for the unrefined baseline and one for the refit, and
    # the block twice more on the held-out quarter of the windows (the block-level check)
    *first, last = sh.groups
    grams_flops = (sum(6 * g * g for g in first) + 2 * last * (2 * last + sh.hidden)) * run.seqlen * N
    refine_once = 3 * forward + L * (3 * whiten + (len(TAUS) + 2) * factor + grams_flops / r.matmul_flops)
    phases["refine"].seconds = refine_once
    if refine_choice(run.refine).tunes:  # the tuning: a forward and a backward (about 3 forwards) per epoch and window,
        # on the fit windows (three quarters), every block (the dense-kept ones' are at most as long); the tuned block
        # ships as trained there. Compensation (dense matrices refitted) is inside the per-block terms above, which
        # count every block's every group.
        phases["refine"].seconds += 3 * run.tune.epochs * 0.75 * forward
    probe_window = fwd_model * run.bo_windows  # a probe's or a search's evaluation on the held-out windows
    for step, groups in probe_groups_of(sh).items():  # a forward over the held-out windows per group
        phases[step].seconds = len(groups) * probe_window
    searching = strategy(run.allocation).search_refines  # refined-kl: a refine pass and an evaluation per candidate
    phases[P.SEARCH].seconds = (searching * (refine_once + probe_window) if searching
                                else run.bo_calls * probe_window)
    # Dobi-SVD: a forward and a backward per training window and step, with an SVD of every layer's activations
    phases[P.TRAINING].seconds = run.dobi.epochs * run.dobi.windows * (3 * fwd_model + L * factor)
    phases[P.UPDATE].seconds = N * fwd_model
    phases["save"].seconds = (sh.params - run.ratio * sh.targeted) * DTYPE_BYTES[run.dtype] / r.copy_bytes_s
    phases["surgery"].seconds = (1 - run.ratio) * sh.targeted * DTYPE_BYTES[run.factor_dtype] / r.copy_bytes_s
    phases["evaluation"].seconds = eval_windows * fwd_model * ((2 - run.ratio) if run.eval_original else 1)


# --- the plan ---
