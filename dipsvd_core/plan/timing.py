"""The time model of a plan: a microbenchmark of one block and of the whitening's factorisations on the run's own
device (Rates), scaled to every phase by its work (timing): each phase's seconds one function registered by
`@time_of(phase)` over the shared `Clock`; a probe's, one held-out evaluation per group of the probes' registry."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation.strategies import strategy
from ..engine import passes as P
from ..engine.data import self_windows
from ..engine.self_text import BATCH, NEW_TOKENS, PROMPT_TOKENS, TOP_P
from ..lowrank.scalings import best_seconds, symmetric_eigh
from ..methods.handlers import handler
from ..refine.choices import TAUS, refine_choice
from .shapes import DTYPE_BYTES, Phase, Run, Shapes, per_phase, probe_groups_of


@dataclass
class Rates:
    block_window_s: float  # one decoder block over one window of seqlen, with the statistics hooks
    block_forward_s: float  # the same without hooks (evaluation, Fisher)
    svd_512_s: float  # SVD of a 512 x 512 matrix in the compute dtype
    eigh_512_s: float
    matmul_flops: float  # compute-dtype matmul rate (flop/s)
    copy_bytes_s: float  # host memory copy rate
    eigh: Callable[[int], float] | None = None  # an eigh's seconds by width (rates.EighTimes); None: eigh_512_s cubed
    gram_flops: float | None = None  # the Grams' matmul rate (TF32 for 16-bit inputs on CUDA); None: matmul_flops
    model_flops: float | None = None  # the model dtype's matmul rate (lm_head); None: matmul_flops
    words: str = ""  # where the rates came from, for the plan's note
    # the model writing its own text (engine/self_text.py): one decoder block's decode step for a group of BATCH
    # documents against a key/value cache of a document's mean length, and the group's top-p sampling over the
    # whole vocabulary; None where not measured (a decode step is then one read of the weights or the group's matmuls)
    decode_block_s: float | None = None
    sample_s: float = 0.0

    def eigh_at(self, width: int) -> float:
        return self.eigh(width) if self.eigh is not None else self.eigh_512_s * (width / 512) ** 3

    @property
    def gram_rate(self) -> float:
        return self.gram_flops or self.matmul_flops

    @property
    def model_rate(self) -> float:
        return self.model_flops or self.matmul_flops


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

    block_s = best_seconds(block_pass, device)
    writes = P.WRITING in run.phases  # the decode step and the sampling timed only for a run that writes text
    decode_s = _decode_block_s(model, cfg.vocab_size, device) if writes else None

    def plain():
        inputs.hidden[0] = x0
        forward_block(blocks[0], inputs)

    plain_s = best_seconds(plain, device)
    del model
    cdt = DTYPES.get(run.compute_dtype, torch.float64)
    a = torch.randn(512, 512, device=device, dtype=cdt)
    svd_s = best_seconds(lambda: torch.linalg.svd(a, full_matrices=False), device)
    g = a @ a.T
    eigh_s = best_seconds(lambda: symmetric_eigh(g), device)  # where the engine runs it (scalings.eigh_on_host)
    host = torch.empty(64 << 20, dtype=torch.uint8)
    copy_s = best_seconds(lambda: host.clone(), torch.device("cpu"))
    eigh, words = _eigh_model(device, run.compute_dtype, eigh_s, sh)
    gram_dtype = torch.float32  # the statistics' and refine's Grams: float32 products (TF32 for 16-bit on CUDA)
    tf32 = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return Rates(block_s, plain_s, svd_s, eigh_s, _matmul_flops(cdt, device), (64 << 20) / copy_s, eigh,
                 _matmul_flops(gram_dtype, device, tf32), _matmul_flops(dtype, device), words, decode_s,
                 _sample_s(sh.vocab, device) if writes else 0.0)


@torch.no_grad()
def _decode_block_s(model, vocab: int, device: torch.device) -> float:
    """One decode step of the one-block model for a group of BATCH documents, its key/value cache as long as a
    prompt and half a document (the group's mean while it writes); with its embedding and small head, what a step
    costs beside the blocks."""
    ids = torch.randint(0, vocab, (BATCH, PROMPT_TOKENS + NEW_TOKENS // 2), device=device)
    cache = model(ids, use_cache=True).past_key_values
    last = ids[:, -1:]  # each timed step adds one token to the cache (three in all)
    return best_seconds(lambda: model(last, past_key_values=cache, use_cache=True), device)


def _sample_s(vocab: int, device: torch.device) -> float:
    """The group's sampling at one step as `generate` does it (temperature 1, top-p TOP_P): its logits sorted over
    the whole vocabulary, the nucleus kept, one token drawn a document."""
    from transformers.generation.logits_process import TopPLogitsWarper

    keep = TopPLogitsWarper(TOP_P)
    logits = torch.randn(BATCH, vocab, device=device)
    ids = torch.zeros(BATCH, 1, dtype=torch.long, device=device)
    return best_seconds(lambda: torch.multinomial(torch.softmax(keep(ids, logits.clone()), -1), 1), device)


def _matmul_flops(dtype: torch.dtype, device: torch.device, tf32: bool = False) -> float:
    """FLOP/s of a 1024-wide matmul in `dtype` on `device` (on the TF32 tensor cores with `tf32`)."""
    from ..engine.stats import matmul_precision

    m = torch.randn(1024, 1024, device=device, dtype=dtype)
    with matmul_precision("tf32" if tf32 else "ieee"):
        return 2 * 1024**3 / best_seconds(lambda: m @ m, device)


def _eigh_model(device: torch.device, compute: str, eigh_512_s: float, sh: Shapes):
    """The eigh times by width in the compute dtype: what is stored for this device (plan.rates) over what was
    measured now (the 512-wide eigh; on CUDA also scalings.eigh_rates' two widths on the device and on the host,
    the engine taking the faster), and the plan's words for where they came from."""
    from .rates import device_name, eigh_times

    widths = sh.eigh_widths
    name = device_name(device)
    if device.type != "cuda" or compute != "float64":
        times = eigh_times(device, compute, {512: eigh_512_s})
        return times, f"eigh in {compute} on {name}: {times.words(widths)}"
    from ..lowrank.scalings import EIGH_WIDTHS, eigh_rates

    fits = dict(zip(("device", "host"), eigh_rates(device)))
    places = {w: eigh_times(device, compute, {n: a + b * n**3 for n in EIGH_WIDTHS}, w) for w, (a, b) in fits.items()}

    def faster(width: int) -> float:
        return min(t(width) for t in places.values())

    return faster, "; ".join(f"eigh in float64 on the {w} ({name if w == 'device' else 'host CPU'}): "
                             f"{t.words(widths)}" for w, t in places.items())


def _whitening_seconds(run: Run, g: int, r: Rates) -> float:
    """One input group's whitening (g x g), as the method's scaling computes it (scalings.py)."""
    cost = getattr(handler(run.method), "scaling", None)
    cost = cost.plan_cost(run.spec) if cost is not None else None
    if cost is None:
        return 0.0
    if run.compute_dtype == "float32":
        return (g / 512) ** 3 * r.svd_512_s if cost.svd_in_float32 else r.eigh_at(g)
    if cost.cholesky:  # scalings.cholesky_root: the factor alone (g^3 / 3 products); its inverse is never formed
        return g**3 / 3 / r.matmul_flops
    return r.eigh_at(g) + cost.products * g**3 / r.matmul_flops


@dataclass(frozen=True)
class Clock:
    """What the phases' seconds are made of, for one model, run and set of rates: `forward`, every block over every
    calibration window with the statistics hooks; `whiten` and `factor`, one block's whitenings and SVDs;
    `lm_head`, the lm_head over one window, and `fwd_model`, one window through the whole model; `probe_window`, an
    evaluation on the held-out windows."""

    sh: Shapes
    run: Run
    r: Rates
    L: int
    N: int
    forward: float
    whiten: float
    factor: float
    lm_head: float
    probe_window: float

    @property
    def fwd_model(self) -> float:
        return self.L * self.r.block_forward_s + self.lm_head

    @property
    def refine_once(self) -> float:
        """The original block, the compressed block up to each input group with the finished attention replayed
        (about 2.5 block forwards a window, measured on the bundled model), every group's G^ and C (the last group,
        the residual-writing Linear: G^ and the H x g numerator) and the original inputs' X X^T, three whitenings
        per group (the original inputs' on the fit windows, G^ on the fit windows, G^ on every window), a factoring
        per candidate damping (refine.TAUS), one for the unrefined baseline and one for the refit, and the block
        twice more on the held-out quarter of the windows (the block-level check)."""
        *first, last = self.sh.groups
        grams_flops = (sum(6 * g * g for g in first) + 2 * last * (2 * last + self.sh.hidden)) * self.run.seqlen * self.N
        return 3 * self.forward + self.L * (3 * self.whiten + (len(TAUS) + 2) * self.factor
                                            + grams_flops / self.r.gram_rate)


def _svd_units(o: int, i: int) -> float:
    return o * i * min(o, i) / 512**3  # an SVD's cost, in 512^3 units


def _clock(sh: Shapes, run: Run, r: Rates) -> Clock:
    L, N = sh.n_blocks, run.calib_windows
    per_block = [(o, i) for b, o, i in sh.matrices if b == 0]
    whiten = sum(_whitening_seconds(run, g, r) for g in sh.groups)
    if run.compute_dtype == "float32":  # factors.factor_matrix: the SVDs themselves
        factor = sum(_svd_units(o, i) * r.svd_512_s + 4 * o * i * i / r.matmul_flops for o, i in per_block)
    else:  # float64: eigendecompositions of the smaller of A A^T and A^T A (A = W S)
        factor = sum(r.eigh_at(min(o, i)) + 2 * o * i * (i + 2 * min(o, i)) / r.matmul_flops for o, i in per_block)
    lm_head = 2 * run.seqlen * sh.hidden * sh.vocab / r.model_rate
    fwd_model = L * r.block_forward_s + lm_head
    return Clock(sh, run, r, L, N, L * N * r.block_window_s, whiten, factor, lm_head, fwd_model * run.bo_windows)


TIMES: dict = {}  # phase -> (Clock) -> seconds; a probe's is one held-out evaluation per group (probes' registry)
time_of = per_phase(TIMES)  # a phase's seconds: one function per phase (a new pass adds its own here)


@time_of("load")
def _load_s(k: Clock) -> float:
    return k.sh.params * DTYPE_BYTES[k.run.dtype] / k.r.copy_bytes_s


@time_of(P.WRITING)
def _writing_s(k: Clock) -> float:
    """Groups of BATCH documents of up to NEW_TOKENS sampled tokens, enough for the self windows and the held-out
    ones beside them, and for distillation's own text (a stream of its own). A decode step of a group: every block's
    measured decode step, the lm_head's products and the sampling; unmeasured, one read of every weight (or the
    group's products, if slower)."""
    calibration = self_windows(k.run.calib, k.N)
    tokens = ((calibration + k.run.bo_windows if calibration else 0) + k.run.own_text) * k.run.seqlen
    groups = math.ceil(tokens / (BATCH * NEW_TOKENS))
    if k.r.decode_block_s is None:
        weights = k.sh.params * DTYPE_BYTES[k.run.dtype]
        step = max(weights / k.r.copy_bytes_s, 2 * k.sh.params * BATCH / k.r.matmul_flops)
    else:
        step = k.L * k.r.decode_block_s + 2 * BATCH * k.sh.hidden * k.sh.vocab / k.r.model_rate
    return groups * NEW_TOKENS * (step + k.r.sample_s)


@time_of(P.STATISTICS)
def _statistics_s(k: Clock) -> float:
    return k.forward + k.L * k.r.eigh_at(k.sh.hidden)


@time_of(P.FACTORS)
def _factors_s(k: Clock) -> float:
    return k.L * (k.whiten + k.factor)


@time_of(P.FISHER)
def _fisher_s(k: Clock) -> float:
    """Per window, four block-forwards of work in every block (fisher.py: the pass that saves the inputs, the forward
    again with autograd, the input gradient, and the weight gradient its hooks form, g^T x) and two of the top (the
    lm_head forward and its input gradient). It counted three whole-model forwards until the default build measured
    94.5 s against 57 s predicted on the bundled model at 32 x 512 (bench/RESULTS.md, "The defaults a user gets")."""
    return k.N * (4 * k.L * k.r.block_forward_s + 2 * k.lm_head)


@time_of(P.REFINE)
def _refine_s(k: Clock) -> float:
    """refine_once; with block tuning, a forward and a backward (about 3 forwards) per epoch and window on the fit
    windows (three quarters), every block (the dense-kept ones' are at most as long); the tuned block ships as
    trained there. Compensation (dense matrices refitted) is inside refine_once's per-block terms, which count every
    block's every group."""
    tuning = 3 * k.run.tune.epochs * 0.75 * k.forward if refine_choice(k.run.refine).tunes else 0.0
    return k.refine_once + tuning


@time_of(P.DISTILL)
def _distill_s(k: Clock) -> float:
    """Per epoch and fit window (the calibration windows and the model's own text), the original's forward and the
    compressed model's forward and backward (about three forwards; with recompute one more), each a whole-model
    forward at most; per epoch and once before, the held-out windows through both models."""
    cfg = k.run.distill
    return (cfg.epochs * (k.N + k.run.own_text) * (4 + cfg.recompute) + (cfg.epochs + 1) * cfg.held * 2) * k.fwd_model


@time_of(P.SEARCH)
def _search_s(k: Clock) -> float:
    searching = strategy(k.run.allocation).search_refines  # refined-kl: a refine pass and an evaluation per candidate
    return searching * (k.refine_once + k.probe_window) if searching else k.run.bo_calls * k.probe_window


@time_of(P.TRAINING)
def _training_s(k: Clock) -> float:
    # Dobi-SVD: a forward and a backward per training window and step, with an SVD of every layer's activations
    return k.run.dobi.epochs * k.run.dobi.windows * (3 * k.fwd_model + k.L * k.factor)


@time_of(P.UPDATE)
def _update_s(k: Clock) -> float:
    return k.N * k.fwd_model


@time_of("save")
def _save_s(k: Clock) -> float:
    return (k.sh.params - k.run.ratio * k.sh.targeted) * DTYPE_BYTES[k.run.dtype] / k.r.copy_bytes_s


@time_of("surgery")
def _surgery_s(k: Clock) -> float:
    return (1 - k.run.ratio) * k.sh.targeted * DTYPE_BYTES[k.run.factor_dtype] / k.r.copy_bytes_s


@time_of("evaluation")
def _evaluation_s(k: Clock) -> float:
    windows = k.run.eval_sets * math.ceil(k.run.eval_tokens / k.run.seqlen)
    return windows * k.fwd_model * ((2 - k.run.ratio) if k.run.eval_original else 1)


def timing(phases: dict[str, Phase], sh: Shapes, run: Run, r: Rates) -> None:
    """Seconds of every phase from the microbenchmark's rates: each phase's registered time, a probe's one
    evaluation on the held-out windows per group."""
    k = _clock(sh, run, r)
    probes = {step: len(groups) * k.probe_window for step, groups in probe_groups_of(sh).items()}
    for name in phases:
        phases[name].seconds = probes[name] if name in probes else TIMES[name](k)


# --- the plan ---
