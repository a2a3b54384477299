"""The memory model of a plan: what each phase holds at its peak on the host and the device (memory, with refine's
working set), where an offloaded run keeps its blocks (place_blocks), and the memory a run has beside its phases
(the runtime, the free host and device memory). Each phase's peak is one function registered by `@cost_of(phase)`
over the shared `Terms`; a probe's comes from the probes' registry (_probe_work)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from ..allocation.allocators import PROBE_KEEP
from ..allocation.budget import matrix_params, rank_for
from ..allocation.fisher import checkpoint_every
from ..allocation.strategies import strategy
from ..engine import passes as P
from ..engine.self_text import BATCH, NEW_TOKENS, PROMPT_TOKENS
from ..refine.choices import DISTILL_SCOPES, refine_choice
from .shapes import (BUILT, DEVICE_HEADROOM, DEVICE_RUNTIME, DTYPE_BYTES, Phase, Run, Shapes, memory_size, per_phase,
                     phases_in_order, probe_groups_of)


def _refine_memory(sh: Shapes, run: Run, cuda: bool, acts: int, factoring: int, layer_saved: int) -> tuple[int, int]:
    """(the activation sets refine keeps, its working set on the device that runs it). Refine (refine.py) streams
    two activation sets (original and compressed) and the block's compressed-path inputs again for its held-out
    check, keeps every input group's X of one block for all windows but the residual-writing last Linear's, the
    attention's output replayed for the later groups, one group's sums and one group's factoring; the refined
    factors of every block gather on the host. On a GPU the per-window activations (the three sets and the groups'
    X) wait in host memory, one window's on the device at a time (refine.Park)."""
    B, T, N, H = DTYPE_BYTES[run.dtype], run.seqlen, run.calib_windows, sh.hidden
    g_max = max(sh.groups)
    # (the last group is the residual-writing Linear's, whose X is not kept; the paths share the kwargs)
    refine_sets = 3 * N * T * H * B + N * T * (sum(sh.groups) - sh.groups[-1] + H) * B
    # float64 g x g matrices of the widest group at once: the residual-writing last Linear (down_proj, the widest in
    # Llama) holds G^ of both parts and, in turn, the original inputs' fit-part Gram or the damped solve's factor and
    # its operand, and a window's product while summing (sums are added in place, the held-out part is let go when
    # both are summed); a plain group also C of both parts and the original inputs' held-out Gram
    sums = 5 if g_max == sh.groups[-1] else 7
    refine_dev = (acts - N * T * H * B) + (refine_sets // N if cuda else refine_sets) \
        + sums * g_max * g_max * 8 + H * g_max * 8 + factoring
    if refine_choice(run.refine).tunes:  # block tuning: float32 masters of the block, their gradients and AdamW's
        # two moments, and one window's autograd through the block (it runs after the group's factoring is freed)
        refine_dev += max(0, 16 * sh.block_params + layer_saved - factoring)
    return refine_sets, refine_dev


def _probe_work(sh: Shapes) -> dict[str, int]:
    """What a probe holds beside the weights, a window and its logits: one group's truncated factors at PROBE_KEEP
    in float32, the largest group's (importance.truncated swaps them in through hooks)."""
    pair = lambda t: matrix_params(rank_for(PROBE_KEEP, t.out_features, t.in_features), t.out_features,  # noqa: E731
                                   t.in_features) * 4
    return {step: max(sum(pair(t) for t in g) for g in groups) for step, groups in probe_groups_of(sh).items()}


@dataclass(frozen=True)
class Terms:
    """What the phases' memory is made of, for one model and run (bytes): the dtypes' sizes B (weights), c (the
    factoring's compute) and s (the stored factors), seqlen T, windows N, hidden H, blocks L, and the working sets
    that several phases share."""

    sh: Shapes
    run: Run
    cuda: bool
    B: int
    c: int
    s: int
    T: int
    N: int
    H: int
    L: int
    weights: int
    per_block: list  # (block, out, in) of the first block's targeted Linears
    kept: int  # parameters of the kept factors (the allocation's budget)
    window: int  # one window inside a block
    acts: int  # the activations between blocks, the rotary tables, one window
    grams: int  # one block's float64 input Grams and the block output's, and a window's product
    factoring: int  # the widest matrix's factoring and one block's factors
    layer_saved: int  # autograd of one block, one window
    logits: int

    @property
    def one_matrix(self) -> int:  # surgery reads one matrix's factors at a time
        return max(o * i for _, o, i in self.sh.matrices)

    @property
    def compressed(self) -> int:  # in place: one model, not two
        return self.kept * self.B - self.sh.targeted * self.B if self.run.inplace else self.kept * self.B

    @property
    def largest(self) -> int:
        """The serialized bytes of the largest saved tensor (the embeddings, or a matrix kept dense)."""
        return max(self.sh.vocab * self.sh.hidden, self.one_matrix) * self.B


def factor_bytes(ms, b: int) -> int:
    """Full-rank factors of these (block, out, in) matrices at b bytes a value, their singular values in float64."""
    return sum(min(o, i) * (o + i) * b + min(o, i) * 8 for _, o, i in ms)


def _terms(sh: Shapes, run: Run, cuda: bool) -> Terms:
    B, c, s = DTYPE_BYTES[run.dtype], DTYPE_BYTES[run.compute_dtype], DTYPE_BYTES[run.factor_dtype]
    T, N, H = run.seqlen, run.calib_windows, sh.hidden
    per_block = [m for m in sh.matrices if m[0] == 0]
    window = T * (4 * H + 3 * sh.window_width) * B + sh.heads * T * T * 4
    acts = N * T * H * B + N * 2 * T * (H // max(sh.heads, 1)) * B * 2 + window
    grams = sum(g * g * 8 for g in sh.groups) + H * H * 8 + max(sh.groups) ** 2 * 12
    o, i = max(((o, i) for _, o, i in per_block), key=lambda m: max(5 * m[1] ** 2, 2 * m[1] ** 2 + 6 * m[0] * m[1]))
    factoring = max(5 * i * i if run.whitens else 2 * i * i, 2 * i * i + 6 * o * i) * c + factor_bytes(per_block, s)
    layer_saved = T * (10 * H + 4 * sh.window_width) * B + sh.heads * T * T * B
    return Terms(sh, run, cuda, B, c, s, T, N, H, sh.n_blocks, sh.params * B, per_block,
                 int((1 - run.ratio) * sh.targeted), window, acts, grams, factoring, layer_saved, 3 * T * sh.vocab * 4)


@dataclass(frozen=True)
class Cost:
    """A phase's memory at its peak: `work` on the device that runs it (besides the runtime), `disk` written to the
    cache folder, `host` kept in host memory on a GPU run besides the weights."""

    work: int
    disk: int = 0
    host: int = 0


COSTS: dict = {}  # phase -> (Terms) -> Cost; a probe's is _probe_work's, from the probes' registry
cost_of = per_phase(COSTS)  # a phase's memory: one function per phase (a new pass adds its own here)


# Drawing the calibration windows (in the load phase) tokenizes the calibration text at once: measured 160 MB more
# than the phase before it on the tiny model and 178 MB at SmolLM2-360M's widths (bench/RESULTS.md, "Depth, the
# uniform path"), whatever the model.
DRAW_BYTES = 170 * 2**20


@cost_of("load")
def _load(t: Terms) -> Cost:
    # A GGUF not yet dequantized holds its float32 arrays, the model built from them and the serialized
    # copy being written at once (measured on the bundled model: 2,131 MB peak for 135M parameters).
    loaded = 0 if t.sh.mapped(t.run) and not t.cuda else t.weights  # mapped pages become resident in the first pass
    gguf = t.sh.from_gguf
    return Cost(t.weights, t.sh.params * 4 if gguf else 0, loaded + DRAW_BYTES + (3 * t.sh.params * 4 if gguf else 0))


@cost_of(P.WRITING)
def _writing(t: Terms) -> Cost:
    """The model samples a group of BATCH documents at once: the key/value cache of the group at its longest
    (prompt and NEW_TOKENS) at the width of its key/value heads, and the
    group's float32 logits of one step with top-p's sorted copy."""
    length = PROMPT_TOKENS + NEW_TOKENS
    return Cost(t.weights + 2 * t.L * (t.sh.kv_width or t.H) * BATCH * length * t.B + 3 * BATCH * t.sh.vocab * 4)


@cost_of(P.STATISTICS)
def _statistics(t: Terms) -> Cost:
    return Cost(t.weights + t.acts + t.grams, sum(g * 16 for g in t.sh.groups) * t.L + t.L * t.H * 8)


@cost_of(P.FACTORS)
def _factors(t: Terms) -> Cost:
    return Cost(t.weights + (t.acts + t.grams if t.run.whitens else 0) + t.factoring,
                factor_bytes(t.sh.matrices, t.s), factor_bytes(t.per_block, t.s))


@cost_of(P.FISHER)
def _fisher(t: Terms) -> Cost:
    """Fisher runs block by block: the kept blocks' inputs (every block's where they fit, else every sqrt(L)-th and
    one segment recomputed: fisher.checkpoint_every), on a GPU waiting in host memory with one block's back on the
    device; the gradients at one level (on a GPU on the host), the last block's outputs (on the device while the
    forward streams), one block's float32 gradient sums and float64 rows, one block's autograd, the logits of one
    window."""
    one_set = t.N * t.T * t.H * t.B
    every = checkpoint_every(t.L, t.L * one_set)
    saved = (t.L if every == 1 else math.ceil(t.L / every) + every - 1) * one_set
    sums = sum(o * i * 4 + i * 8 for _, o, i in t.per_block)
    work = (2 * one_set if t.cuda else saved + 2 * one_set) + sums + t.layer_saved + t.logits
    return Cost(t.weights + work, sum(i * 8 for _, _, i in t.sh.matrices), saved + one_set)


@cost_of(P.REFINE)
def _refine(t: Terms) -> Cost:
    sets, dev = _refine_memory(t.sh, t.run, t.cuda, t.acts, t.factoring, t.layer_saved)
    return Cost(t.weights + dev + (t.kept * t.B if not t.cuda else 0), 0, t.kept * t.B + sets)


@cost_of(P.DISTILL)
def _distill(t: Terms) -> Cost:
    """End-to-end distillation (refine/distill.py): the original (the teacher) and the compressed model on the device
    at once, the trainable parameters (at most the kept parameters, or the norms alone; with the dense matrices, their
    copies too) with their gradients, AdamW's two float32 moments and the best epoch's float32 copy (16-bit weights
    add a float32 master and its gradient), one window's autograd through every block, and the logits of both models
    and their gradient. With recompute (gradient checkpointing), autograd keeps every block's input and one block's
    working set at a time instead of every block's."""
    scope = DISTILL_SCOPES[t.run.distill.scope]
    params = t.kept if scope.factors else (2 * t.L + 1) * t.H  # norms alone: two a block and the last
    trainable = params * (t.B + 12 + (8 if t.B < 4 else 0))
    copies = t.kept * t.B if scope.dense else 0  # the dense matrices' own copies, at most the kept parameters
    saved = t.L * t.T * t.H * t.B + t.layer_saved if t.run.distill.recompute else t.L * t.layer_saved
    return Cost(t.weights + t.kept * t.B + copies + trainable + saved + 2 * t.logits + t.window)


@cost_of(P.SEARCH)
def _search(t: Terms) -> Cost:
    """BO: the allocation's low-rank modules swapped into the one model (on a GPU the swapped-out dense weights wait
    on the host); a search that refines each candidate holds refine's working set."""
    own = Cost(t.weights + t.kept * t.B - (t.sh.targeted * t.B if t.cuda else 0) + t.logits + t.window, 0,
               t.sh.targeted * t.B)
    if not strategy(t.run.allocation).search_refines:
        return own
    refine = _refine(t)
    return Cost(max(own.work, refine.work), 0, max(own.host, refine.host))


@cost_of(P.TRAINING)
def _training(t: Terms) -> Cost:  # Dobi-SVD's training: every block's autograd for one window
    return Cost(t.weights + t.L * t.layer_saved + t.logits)


@cost_of(P.UPDATE)
def _update(t: Terms) -> Cost:
    """Dobi-SVD's weight update: the activations between blocks and one block's float64 incremental PCA states
    (dobi.ipca_weights streams block by block)."""
    return Cost(t.weights + t.acts + sum(o * o for _, o, _ in t.per_block) * 8 + t.window)


@cost_of("surgery")
def _surgery(t: Terms) -> Cost:
    return Cost(t.weights + (0 if t.run.inplace else t.kept * t.B) + t.one_matrix * (t.s + t.B), 0, t.one_matrix * t.s)


@cost_of("evaluation")
def _evaluation(t: Terms) -> Cost:  # in place: the original's turn is the larger
    return Cost(t.weights + max(t.compressed, 0) + t.logits + t.window)


@cost_of("save")
def _save(t: Terms) -> Cost:
    """The compressed model and the serialized bytes of its largest tensor; measured at 32 blocks of SmolLM2-360M's
    widths, 1,840 MB against 1,140 MB saved and the runtime. On a GPU each tensor is copied to the host as it is
    written."""
    return Cost(t.weights + t.compressed + t.largest, 0, t.largest)


def _work(sh: Shapes, run: Run, cuda: bool) -> tuple[dict, dict, dict]:
    """(work, disk, host) per phase, from each phase's registered cost (a probe's from the probes' registry: the
    truncated factors of its largest group, _probe_work)."""
    t = _terms(sh, run, cuda)
    probes = {step: Cost(t.weights + group + t.logits + t.window) for step, group in _probe_work(sh).items()}
    costs = {name: probes[name] if name in probes else COSTS[name](t) for name in phases_in_order()}
    return ({n: c.work for n, c in costs.items()}, {n: c.disk for n, c in costs.items()},
            {n: c.host for n, c in costs.items()})


def memory(sh: Shapes, run: Run, cuda: bool, runtime: int) -> dict[str, Phase]:
    """Bytes of every phase at its peak (host, device, disk); seconds are filled in by `timing`. Which phases
    are needed comes from the settings' declared needs (Run.phases)."""
    work, disk, host = _work(sh, run, cuda)
    block = sh.block_params * DTYPE_BYTES[run.dtype]
    needed = run.phases
    on_disk = run.disk_blocks if run.offload else 0
    disk = dict(disk, load=disk["load"] + on_disk * block)  # the offload folder, written at load
    spared = max(0, on_disk - 1) * block  # on the CPU: blocks on disk, one of them in memory at a time
    streamed_blocks = sh.n_blocks - run.device_blocks
    # in place and offloaded: the streamed blocks' low-rank pairs stay on the device once built (the device
    # blocks' replace their own weights, already counted)
    pairs = int((1 - run.ratio) * sh.targeted) * DTYPE_BYTES[run.dtype] * streamed_blocks // sh.n_blocks \
        if run.offload and run.inplace else 0
    phases = {}
    for name in phases_in_order():
        if not cuda:
            h, dev = runtime + max(0, (host["load"] if name == "load" else work[name]) - spared), 0
        elif run.offload:  # place_blocks: the embeddings, head and device_blocks on the device, the rest streamed
            on_device = run.device_blocks
            # the block computing and the next one, sent ahead (offload.Ahead); its pinned host copy beside
            streamed = block * min(2, sh.n_blocks - on_device)
            staging = block if on_device < sh.n_blocks else 0
            # once built, the pairs take the streamed blocks' place (an evaluation of the original streams first)
            streamed = max(streamed, pairs) if name in BUILT else streamed
            dev = work[name] - sh.n_blocks * block + on_device * block + streamed
            h = runtime + (sh.n_blocks - on_device - on_disk) * block + staging + {
                n: host[n] for n in (P.FACTORS, P.REFINE, P.FISHER)}.get(name, 0)
        else:
            dev, h = work[name], runtime + host.get(name, 0)
        phases[name] = Phase(int(h), int(dev), int(disk[name]), None, name in needed)
    return phases


@dataclass(frozen=True)
class Placement:
    """Where an offloaded run keeps its decoder blocks: `device` of them on the device for the whole run, `host` in
    host memory and `disk` in the offload folder, both of those sent to the device one block per pass. On the CPU
    (`gpu` false) the device is the host: `device` blocks in memory, the others on disk, read one per pass."""

    device: int
    host: int
    disk: int
    gpu: bool = True
    # accelerate's device map of these counts (model.offload.block_device_map), made by the plan from the config it
    # read, so that loading does not read it again: (module, where) pairs
    device_map: tuple | None = field(default=None, compare=False)

    def words(self) -> str:
        if not self.gpu:
            return f"{self.device} blocks in memory, {self.disk} on disk"
        return f"{self.device} blocks on the GPU, {self.host} in host memory, {self.disk} on disk"


def _fit(budget: int, work: int, block: int, n_blocks: int, streamed: int = 1) -> int:
    """How many blocks a budget keeps beside a working set that holds `streamed` streamed blocks (on a GPU the one
    computing and the next, sent ahead); all of them where all but those fit, since then none streams."""
    fit = max(0, (budget - work) // block)
    return n_blocks if fit >= n_blocks - streamed else int(fit)


def place_blocks(sh: Shapes, run: Run, runtime: int, device_budget: int | None, host_budget: int,
                 cuda: bool = True) -> Placement:
    """Where the blocks of an offloaded run live, from the memory budgets. On a GPU: the plan's working set of
    every phase with every block streamed (the embeddings, the head and one block on the device) comes first; as
    many blocks as the rest of `device_budget` holds (less DEVICE_RUNTIME and DEVICE_HEADROOM) stay on the device,
    as many of the others as the rest of
    `host_budget` holds wait in host memory, and the remainder go to disk. On the CPU: as many as `host_budget`
    holds beside the working set with every block on disk (one read at a time) stay in memory."""
    block, L = sh.block_params * DTYPE_BYTES[run.dtype], sh.n_blocks
    if not cuda:
        streamed = memory(sh, dataclasses.replace(run, offload=True, disk_blocks=L), False, runtime)
        in_memory = _fit(host_budget, max(p.host_bytes for p in streamed.values() if p.needed), block, L)
        return Placement(in_memory, 0, L - in_memory, gpu=False)
    streamed = memory(sh, dataclasses.replace(run, offload=True, device_blocks=0, disk_blocks=0), True, runtime)
    needed = [p for p in streamed.values() if p.needed]
    on_device = _fit(device_budget - DEVICE_RUNTIME - DEVICE_HEADROOM, max(p.device_bytes for p in needed), block, L,
                     min(2, L))
    host_work = max(p.host_bytes for p in needed) - L * block  # the blocks' bytes apart
    on_host = min(L - on_device, max(0, (host_budget - host_work) // block))
    return Placement(on_device, int(on_host), int(L - on_device - on_host))


# What a run holds beyond the imports, measured on the CPU at SmolLM2-360M's widths (/proc/self/status VmRSS): the
# loaded tokenizer, about 2.7 KB per vocabulary entry (133 MB for 49,152), and the modeling code with the
# calibration text cut into windows (121 MB).
TOKENIZER_BYTES_PER_TOKEN = 2_700
RUN_FIXED_BYTES = 121 * 2**20


def run_overhead(sh: Shapes) -> int:
    """The tokenizer, modeling code and calibration text a run holds besides the imports and the model."""
    return TOKENIZER_BYTES_PER_TOKEN * sh.vocab + RUN_FIXED_BYTES


def runtime_bytes() -> int:
    """This process's resident memory now: Python, torch and transformers loaded, no model yet. DIPSVD_STUDIO_RUNTIME
    (a size such as 1GiB) replaces it: a plan made for another process (the browser test pins the app server's
    placement with it)."""
    fixed = os.environ.get("DIPSVD_STUDIO_RUNTIME", "").strip()
    if fixed:
        return memory_size(fixed)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None


def free_device_bytes(device: torch.device) -> int:
    """What the card has free now, after the caching allocator gives back the blocks it keeps unused (a second
    plan in the same process, after a run, would otherwise count them as taken)."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]
