"""A plan before the run: predicted memory, disk and time of each phase, from the config alone.

`make_plan` reads a model's config (a folder that holds only `config.json` is enough, as are a hub id
when online and a GGUF's metadata), builds the module tree on the meta device
(`accelerate.init_empty_weights`: no weights are allocated or read), finds the targeted Linears as
the engine does, and learns which of them share an input by one forward pass on meta tensors. From
these shapes it adds up what each phase holds at its peak:

- load: the weights (on the host first, since transformers loads there, then on the device);
  a GGUF not dequantized yet also holds three float32 copies while it is converted (the arrays,
  the model, the serialized file), as measured on the bundled model.
- statistics (stats.stream_stats): the weights, the calibration activations between blocks
  (windows x seqlen x hidden), one window's transients inside a block, and one block's Grams in
  float64 (one per input group, plus the block output's), with the float32 product of a window.
- factors (the same pass for svd-llm and dipsvd): the above plus the factoring of the largest matrix
  in the compute dtype (the whitening's SVD of the in x in Gram, the SVD of W S) and the block's
  factors before they are written.
- Fisher (importance.fisher_info, block by block): the weights, the kept blocks' inputs for every window
  (every block's up to importance.FISHER_KEEP_BYTES, else every sqrt(L)-th block's and one recomputed segment),
  the gradients at one block boundary, one block's float32 gradient sums and autograd, one window's logits.
- surgery: the weights plus the kept factors at this ratio (read from disk one matrix at a time). compress
  converts the model in place, dropping each dense matrix as its factors replace it; the app keeps the
  original beside the compressed copy (`Run.inplace=False`).
- evaluation: the model (or both), one window's activations and float32 logits.
- save (compress --out): the compressed model and its largest tensor's serialized bytes.

On a CUDA device these go to the device and the host holds the runtime and the factors being
written; with `offload` the blocks are placed by the memory budgets (`place_blocks`): as many as fit stay on the
device, the others wait in host memory or on disk and come to the device one at a time. An in-place build of an
offloaded model puts each streamed block's low-rank pair on the device for good (surgery.placement_of), so surgery,
evaluation and save count every streamed block's kept factors there, in place of the one streamed block. Beside the phases' tensors (what
torch.cuda.max_memory_allocated measures) the device peak counts `DEVICE_RUNTIME`: the CUDA context and the
libraries' workspaces, which the allocator does not see but the card's free memory does. On the CPU everything is
host memory, and `device_bytes` is 0; there `offload` keeps the blocks that do not fit on disk. Every phase adds the runtime measured
in this process (Python, torch and transformers imported) and what a run holds besides (`run_overhead`: the
tokenizer, the modeling code, the calibration text). On the CPU, weights saved as safetensors in the run's dtype are
mapped, not copied, so loading holds none of them; they become resident in the first pass (`Shapes.mapped`).

Time comes from a microbenchmark of a few seconds on the device: one decoder block of the real
widths (random weights, vocabulary cut to 1024) run over one window with the statistics hooks, and
the SVD and eigendecomposition of a 512 x 512 matrix in the compute dtype, scaled by their
O(m n min(m, n)) cost (in float64 the factors take eigendecompositions only, as factors.py does).
Loading is timed as a host memory copy of the weights, so it leaves out reading the disk and a
GGUF's first dequantization.

`check_fits` refuses a plan that does not fit, naming the one option that would.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..allocation.importance import checkpoint_every
from ..allocation.strategies import strategy
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..lowrank.scalings import symmetric_eigh
from ..methods.handlers import handler, needs
from ..methods.settings import Settings
from ..refine.choices import TAUS, refine_choice

# every pass of passes.py has its phase (the Gram whitening is counted in the statistics phase), between loading
# and the build's surgery and evaluation, which every run has
PHASES = ("load", P.STATISTICS, P.FACTORS, P.FISHER, P.BLOCK_PROBE, P.TYPE_PROBE, P.SEARCH, P.TRAINING, P.UPDATE,
          P.REFINE, "surgery", "evaluation", "save")
ALWAYS = ("load", "surgery", "evaluation")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
# Device memory outside torch's allocator, on every CUDA run: the context with torch's kernel images loaded lazily
# (CUDA 11.7 and later; commonly 0.3 to 0.5 GiB on data-centre cards, the upper end taken), and a workspace margin:
# cuBLAS/cuBLASLt workspaces per handle and stream (32 MiB each on Hopper), cuSOLVER's and the attention kernels'
# buffers, and the caching allocator's rounding of blocks to 2 and 20 MiB. Not yet measured on a GPU (issue 39).
CUDA_CONTEXT_BYTES = GiB // 2
WORKSPACE_BYTES = GiB // 2
DEVICE_RUNTIME = CUDA_CONTEXT_BYTES + WORKSPACE_BYTES
# What an offloaded run's placement leaves of the device budget beyond the predicted peak and DEVICE_RUNTIME: the
# caching allocator's fragmentation and whatever the memory model does not count (not yet measured on a GPU)
DEVICE_HEADROOM = 3 * GiB // 2
BUILT = ("surgery", "evaluation", "save")  # the phases after the build has replaced the targeted Linears


@dataclass
class Shapes:
    """What the plan needs to know about a model, read from its config and meta module tree."""

    n_blocks: int
    hidden: int
    vocab: int
    heads: int
    params: int  # unique parameters
    block_params: int  # the largest block's parameters
    matrices: list[tuple[int, int, int]]  # (block, out, in) of every targeted Linear
    groups: list[int]  # one block's input groups: the in_features of each Gram
    window_width: int  # widest activation inside a block (the MLP's intermediate)
    from_gguf: bool = False
    grouped_by: str = "meta forward"  # or "one Gram per Linear (an upper bound)"
    stored_dtype: str | None = None  # the dtype config.json says the weights are saved in

    def mapped(self, run) -> bool:
        """Whether loading for `run` on the CPU maps the saved weights instead of copying them: safetensors read at
        the dtype they are stored in stay pages of the file, resident as they are first read (by the first pass),
        not at load (measured: 438 MB after loading a 2-block model of 267 MB of weights, 773 MB after one forward)."""
        return not self.from_gguf and self.stored_dtype == run.dtype

    @property
    def targeted(self) -> int:
        return sum(o * i for _, o, i in self.matrices)


@dataclass
class Phase:
    host_bytes: int
    device_bytes: int
    disk_bytes: int
    seconds: float | None
    needed: bool = True


@dataclass
class Plan:
    model: str
    device: str
    settings: dict
    phases: dict[str, Phase]
    shapes: dict
    runtime_bytes: int
    notes: list[str] = field(default_factory=list)
    free_host_bytes: int | None = None
    free_device_bytes: int | None = None
    free_disk_bytes: int | None = None
    shape: Shapes | None = field(default=None, repr=False)
    run: Run | None = field(default=None, repr=False)
    placement: Placement | None = None  # an offloaded run's blocks (place_blocks)
    device_runtime_bytes: int = 0  # on CUDA: DEVICE_RUNTIME, counted in the device peak beside the phases

    def _peak(self, attr: str) -> int:
        return max(getattr(p, attr) for p in self.phases.values() if p.needed)

    @property
    def peak_host_bytes(self) -> int:
        return self._peak("host_bytes")

    @property
    def peak_device_bytes(self) -> int:
        tensors = self._peak("device_bytes")
        return tensors + self.device_runtime_bytes if tensors else 0

    @property
    def disk_bytes(self) -> int:
        return sum(p.disk_bytes for p in self.phases.values() if p.needed)

    @property
    def seconds(self) -> float | None:
        times = [p.seconds for p in self.phases.values() if p.needed]
        return None if any(t is None for t in times) else sum(times)

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "settings": self.settings,
                "phases": {n: dataclasses.asdict(p) for n, p in self.phases.items()},
                "peak_host_bytes": self.peak_host_bytes, "peak_device_bytes": self.peak_device_bytes,
                "disk_bytes": self.disk_bytes, "seconds": self.seconds, "runtime_bytes": self.runtime_bytes,
                "free_host_bytes": self.free_host_bytes, "free_device_bytes": self.free_device_bytes,
                "free_disk_bytes": self.free_disk_bytes, "shapes": self.shapes, "notes": self.notes,
                "placement": None if self.placement is None else dataclasses.asdict(self.placement)}

    def table(self) -> str:
        rows = [f"plan for {self.model} on {self.device} ({_settings_words(self.settings)})",
                f"{'phase':<13} {'host':>10} {'device':>10} {'disk':>10} {'time':>9}"]
        for n, p in self.phases.items():
            t = "?" if p.seconds is None else _seconds(p.seconds)
            rows.append(f"{n:<13} {_gb(p.host_bytes):>10} {_gb(p.device_bytes):>10} {_gb(p.disk_bytes):>10} "
                        f"{t:>9}" + ("" if p.needed else "  (not needed by these settings)"))
        total = "?" if self.seconds is None else _seconds(self.seconds)
        rows.append(f"{'peak':<13} {_gb(self.peak_host_bytes):>10} {_gb(self.peak_device_bytes):>10} "
                    f"{_gb(self.disk_bytes):>10} {total:>9}")
        free = [f"{w} {_gb(b)}" for w, b in (("host", self.free_host_bytes), ("device", self.free_device_bytes),
                                             ("disk", self.free_disk_bytes)) if b is not None]
        if free:
            rows.append("free now: " + ", ".join(free))
        if self.free_device_bytes and self.device_runtime_bytes:
            rows.append(f"device left free at the peak: {_gb(self.free_device_bytes - self.peak_device_bytes)} "
                        f"(the peak counts {_gb(self.device_runtime_bytes)} for the CUDA context and workspaces)")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _gb(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if b else "-"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min"


def _settings_words(s: dict) -> str:
    return (f"{s['method']}, {s['calib_windows']} x {s['seqlen']} calibration tokens, ratio {s['ratio']:g}, "
            f"{s['dtype']} weights, {s['compute_dtype']} compute, {s['factor_dtype']} factors"
            + (", offload" if s["offload"] else ""))


# --- reading a model without its weights ---

def load_config(spec: str, trust_remote_code: bool = False):
    """(config, from_gguf) for the same specs as models.load_model, reading no weights."""
    from transformers import AutoConfig

    from ..io.compressed import is_compressed_folder
    from ..model.models import DEFAULT_MODEL, bundled_gguf, dequantized_cache, gguf_parsed_once, hub_reachable

    spec = (spec or DEFAULT_MODEL).strip()
    path = Path(os.path.expanduser(spec))
    gguf = None
    if spec.lower() in (DEFAULT_MODEL, "default", "smollm2"):
        gguf = bundled_gguf()
    elif spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise DipSVDError(f"GGUF file not found: {spec}; check the path")
        gguf = path
    if gguf is not None:
        done = dequantized_cache(gguf)
        if (done / "config.json").exists():
            return AutoConfig.from_pretrained(str(done)), False
        try:
            with gguf_parsed_once():  # the load that usually follows reuses this parse
                return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), True
        except Exception as e:
            raise DipSVDError(f"could not read the config in GGUF file {gguf}: {e}") from e
    if path.exists():
        if not (path / "config.json").is_file():
            raise DipSVDError(f"{spec} holds no config.json; give a model folder, a .gguf file or a hub id")
        if is_compressed_folder(path):
            raise DipSVDError(f"{spec} is a compressed model already; plan the original model instead")
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), False
        except (ValueError, OSError, TypeError) as e:  # e.g. a config.json without model_type, or not JSON
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DipSVDError(f"{spec}/config.json is not a transformers model config ({first}); give the folder "
                              "a model was saved to, with its config.json") from e
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DipSVDError(f"model path not found: {spec}; check the path, or give a hub id like HuggingFaceTB/SmolLM2-135M")
    offline = not hub_reachable()
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=offline), False
    except Exception as e:
        where = "the hub is unreachable (offline) and it is not in the local hub cache" if offline else str(e)[:200]
        raise DipSVDError(f"could not read the config of '{spec}' ({where}); download its config.json into a "
                          "folder and plan that folder") from e


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DipSVDError(f"unsupported architecture {getattr(config, 'model_type', '?')}: transformers cannot "
                          f"build it as a causal LM ({str(e)[:200]})") from e


def _input_groups(model: nn.Module, block: nn.Module, linears: dict[str, nn.Linear]) -> list[int] | None:
    """in_features of each distinct input tensor of the block's Linears, from one forward on meta tensors."""
    seen: dict[int, tuple] = {}
    def hook(mod, args):
        seen.setdefault(id(args[0]), (args[0], mod.in_features))

    handles = [m.register_forward_pre_hook(hook) for m in linears.values()]

    class Stop(Exception):
        pass

    handles.append(block.register_forward_hook(lambda *a: (_ for _ in ()).throw(Stop())))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long, device="meta"))  # (use_cache=False trips a .item() on meta)
    except Stop:
        return [v[1] for v in seen.values()]
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    return None


def shapes_of(config, trust_remote_code: bool = False, from_gguf: bool = False) -> Shapes:
    from ..model.models import count_params, find_blocks, find_targets

    model = meta_model(config, trust_remote_code)
    if getattr(config, "tie_word_embeddings", False):  # from_config on meta does not tie: count them once
        model.tie_weights()
    _, blocks = find_blocks(model)
    targets = find_targets(model)
    first = [t for t in targets if t.block == 0]
    linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    groups = _input_groups(model, blocks[0], linears)
    grouped_by = "meta forward"
    if groups is None:
        groups, grouped_by = [t.in_features for t in first], "one Gram per Linear (an upper bound)"
    hidden = int(getattr(config, "hidden_size", 0) or max(t.in_features for t in first))
    widest = max(max(t.out_features, t.in_features) for t in first)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    return Shapes(len(blocks), hidden, vocab, heads, count_params(model), block_params,
                  [(t.block, t.out_features, t.in_features) for t in targets], groups, widest, from_gguf, grouped_by,
                  stored)


# --- the memory model ---

@dataclass(frozen=True)
class Run:
    """What a plan depends on: the compression's own settings (settings.py, whose needs give the phases) and how
    the run is carried out."""

    settings: Settings = field(default_factory=Settings)
    calib_windows: int = 32
    seqlen: int = 512
    eval_tokens: int = 16384
    eval_sets: int = 2
    eval_original: bool = True
    dtype: str = "float32"
    offload: bool = False
    device_blocks: int = 0  # offloaded: blocks kept on the device for the whole run (the others stream, place_blocks)
    disk_blocks: int = 0  # offloaded: blocks in the offload folder on disk, not in host memory
    inplace: bool = True  # compress converts the model in place; the app keeps the original beside the copy
    save: bool = False  # the compressed model is saved (compress --out)

    def __getattr__(self, name):  # the settings' fields read as the run's own (run.method, run.ratio, ...)
        if name == "settings":
            raise AttributeError(name)
        return getattr(self.settings, name)

    @property
    def phases(self) -> frozenset:
        """The phases these settings run (from the declared needs of the method, the scaling and the allocation)."""
        return P.phases(needs(self.settings)) | frozenset(ALWAYS) | frozenset(("save",) if self.save else ())

    @property
    def whitens(self) -> bool:
        """Whether the method whitens by the input Grams (factored inside the statistics pass)."""
        scaling = getattr(handler(self.method), "scaling", None)
        return scaling is not None and P.GRAMS in scaling.needs

    def flat(self) -> dict:
        return {**dataclasses.asdict(self.settings), **{f.name: getattr(self, f.name) for f in
                                                        dataclasses.fields(self) if f.name != "settings"}}

    def replace(self, **changes) -> "Run":
        """A copy with some fields changed, the settings' fields included."""
        own = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in changes.items() if k in own}
        theirs = {k: v for k, v in changes.items() if k not in own}
        return dataclasses.replace(self, **mine, settings=dataclasses.replace(self.settings, **theirs))


def run_of(**fields) -> Run:
    """A Run from flat fields: the settings' fields go into its settings, the others are the run's own."""
    return Run().replace(**fields)


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


def _work(sh: Shapes, run: Run, cuda: bool) -> tuple[dict, dict, dict]:
    """(work, disk, host) per phase: what its peak holds on the device that runs it (besides the runtime), what it
    writes to the cache folder, and what it keeps in host memory on a GPU run besides the weights."""
    B, c, s = DTYPE_BYTES[run.dtype], DTYPE_BYTES[run.compute_dtype], DTYPE_BYTES[run.factor_dtype]
    T, N, H, L = run.seqlen, run.calib_windows, sh.hidden, sh.n_blocks
    weights = sh.params * B
    per_block = [m for m in sh.matrices if m[0] == 0]
    factor_bytes = lambda ms, b: sum(min(o, i) * (o + i) * b + min(o, i) * 8 for _, o, i in ms)  # noqa: E731
    kept = int((1 - run.ratio) * sh.targeted)  # parameters of the kept factors (the allocation's budget)
    window = T * (4 * H + 3 * sh.window_width) * B + sh.heads * T * T * 4  # one window inside a block
    acts = N * T * H * B + N * 2 * T * (H // max(sh.heads, 1)) * B * 2 + window  # between blocks, rotary, one window
    grams = sum(g * g * 8 for g in sh.groups) + H * H * 8 + max(sh.groups) ** 2 * 12  # + a window's product
    o, i = max(((o, i) for _, o, i in per_block), key=lambda m: max(5 * m[1] ** 2, 2 * m[1] ** 2 + 6 * m[0] * m[1]))
    factoring = max(5 * i * i if run.whitens else 2 * i * i, 2 * i * i + 6 * o * i) * c + factor_bytes(per_block, s)
    layer_saved = T * (10 * H + 4 * sh.window_width) * B + sh.heads * T * T * B  # autograd of one block, one window
    logits = 3 * T * sh.vocab * 4
    # Fisher runs block by block: the kept blocks' inputs (every block's where they fit, else every sqrt(L)-th and
    # one segment recomputed: importance.checkpoint_every), on a GPU waiting in host memory with one block's back
    # on the device; the gradients at one level (on a GPU on the host), the last block's outputs (on the device
    # while the forward streams), one block's float32 gradient sums and float64 rows, one block's autograd, the
    # logits of one window
    one_set = N * T * H * B
    every = checkpoint_every(L, L * one_set)
    fisher_saved = (L if every == 1 else math.ceil(L / every) + every - 1) * one_set
    sums = sum(o * i * 4 + i * 8 for _, o, i in per_block)
    fisher = (2 * one_set if cuda else fisher_saved + 2 * one_set) + sums + layer_saved + logits
    host_fisher = fisher_saved + one_set  # on a GPU: the kept inputs and the gradients
    one_matrix = max(o * i for _, o, i in sh.matrices)  # surgery reads one matrix's factors at a time
    # save: the compressed model and the serialized bytes of its largest tensor (the embeddings, or a matrix kept
    # dense); measured at 32 blocks of SmolLM2-360M's widths, 1,840 MB against 1,140 MB saved and the runtime
    largest = max(sh.vocab * sh.hidden, one_matrix) * B
    compressed = kept * B - sh.targeted * B if run.inplace else kept * B  # in place: one model, not two
    refine_sets, refine_dev = _refine_memory(sh, run, cuda, acts, factoring, layer_saved)
    # The probes hold the truncated factors of what they cut at keep 0.25: one block's, or one matrix type's in
    # every block; a search (BO) the allocation's low-rank modules swapped into the one model (on a GPU the
    # swapped-out dense weights wait on the host); Dobi-SVD's training every block's autograd
    # for one window, its weight update the activations between blocks and one block's float64 incremental PCA
    # states (dobi.ipca_weights streams block by block).
    probe = lambda ms: factor_bytes([(b, o, i) for b, o, i in ms], 4) // 4 + logits + window  # noqa: E731
    widest_type = max(sum(o * i for _, o, i in per_block if (o, i) == (o2, i2)) for _, o2, i2 in per_block)
    work = {"load": weights, P.STATISTICS: weights + acts + grams,
            P.FACTORS: weights + (acts + grams if run.whitens else 0) + factoring,
            P.FISHER: weights + fisher,
            P.BLOCK_PROBE: weights + probe(per_block),
            P.TYPE_PROBE: weights + L * widest_type * 4 + logits + window,
            P.SEARCH: weights + kept * B - (sh.targeted * B if cuda else 0) + logits + window,
            P.TRAINING: weights + L * layer_saved + logits,
            P.UPDATE: weights + acts + sum(o * o for _, o, _ in per_block) * 8 + window,
            P.REFINE: weights + refine_dev + (kept * B if not cuda else 0),
            "surgery": weights + (0 if run.inplace else kept * B) + one_matrix * (s + B),
            "evaluation": weights + max(compressed, 0) + logits + window,  # in place: the original's turn is larger
            "save": weights + compressed + largest}
    disk = dict.fromkeys(PHASES, 0) | {
        "load": sh.params * 4 if sh.from_gguf else 0,
        P.STATISTICS: sum(g * 16 for g in sh.groups) * L + L * H * 8,
        P.FACTORS: factor_bytes(sh.matrices, s), P.FISHER: sum(i * 8 for _, _, i in sh.matrices)}
    # A GGUF not yet dequantized holds its float32 arrays, the model built from them and the serialized
    # copy being written at once (measured on the bundled model: 2,131 MB peak for 135M parameters).
    loaded = 0 if sh.mapped(run) and not cuda else weights  # mapped pages become resident in the first pass
    host = {"load": loaded + (3 * sh.params * 4 if sh.from_gguf else 0), P.FACTORS: factor_bytes(per_block, s),
            P.REFINE: kept * B + refine_sets, P.FISHER: host_fisher, "surgery": one_matrix * s, P.SEARCH: sh.targeted * B,
            "save": largest}  # on a GPU each tensor is copied to the host as it is written
    if strategy(run.allocation).search_refines:  # a search that refines each candidate holds refine's working set
        work[P.SEARCH] = max(work[P.SEARCH], work[P.REFINE])
        host[P.SEARCH] = max(host[P.SEARCH], host[P.REFINE])
    return work, disk, host


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
    for name in PHASES:
        if not cuda:
            h, dev = runtime + max(0, (host["load"] if name == "load" else work[name]) - spared), 0
        elif run.offload:  # place_blocks: the embeddings, head and device_blocks on the device, the rest streamed
            on_device = run.device_blocks
            streamed = block if on_device < sh.n_blocks else 0
            # once built, the pairs take the streamed block's place (an evaluation of the original streams first)
            streamed = max(streamed, pairs) if name in BUILT else streamed
            dev = work[name] - sh.n_blocks * block + on_device * block + streamed
            h = runtime + (sh.n_blocks - on_device - on_disk) * block + {
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

    def words(self) -> str:
        if not self.gpu:
            return f"{self.device} blocks in memory, {self.disk} on disk"
        return f"{self.device} blocks on the GPU, {self.host} in host memory, {self.disk} on disk"


def _fit(budget: int, work: int, block: int, n_blocks: int) -> int:
    """How many blocks a budget keeps beside a working set that holds one streamed block; all of them where all but
    one fit, since then none streams."""
    fit = max(0, (budget - work) // block)
    return n_blocks if fit >= n_blocks - 1 else int(fit)


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
    on_device = _fit(device_budget - DEVICE_RUNTIME - DEVICE_HEADROOM, max(p.device_bytes for p in needed), block, L)
    host_work = max(p.host_bytes for p in needed) - L * block  # the blocks' bytes apart
    on_host = min(L - on_device, max(0, (host_budget - host_work) // block))
    return Placement(on_device, int(on_host), int(L - on_device - on_host))


# --- the microbenchmark ---

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
    from ..model.models import DTYPES, find_blocks

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
    phases[P.BLOCK_PROBE].seconds = L * probe_window
    phases[P.TYPE_PROBE].seconds = len(per_block) * probe_window
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


def make_plan(model: str, device: str | None = None, run: Run = Run(), bench: bool = True,
              trust_remote_code: bool = False, budgets: dict | None = None) -> Plan:
    """The plan for compressing `model` with these settings on `device` (auto: CUDA when present).
    `device="cuda"` on a machine without CUDA plans the memory only (no time, no free memory). `budgets`
    ({"device": bytes, "host": bytes}, None for what is free now) replace the free memory the plan is checked
    against (check_fits); one smaller than a decoder block's weights is refused at once (`check_budgets`)."""
    import transformers  # noqa: F401  (the runtime the plan measures includes it)

    from ..common.cache import cache_dir

    want = device or "auto"
    has_cuda = torch.cuda.is_available()
    if want == "auto":
        want = "cuda" if has_cuda else "cpu"
    try:
        dev = torch.device(want)
    except RuntimeError as e:
        raise DipSVDError(f"unknown device '{device}'; use auto, cpu or cuda") from e
    cuda = dev.type == "cuda"
    if run.dtype == "auto":
        run = dataclasses.replace(run, dtype="bfloat16" if cuda else "float32")
    runtime = runtime_bytes()
    config, from_gguf = load_config(model, trust_remote_code)
    sh = shapes_of(config, trust_remote_code, from_gguf)
    runtime += run_overhead(sh)
    budgets = budgets or {}
    free_device = free_device_bytes(dev) if cuda and has_cuda else None
    placement = None
    if run.offload and (not cuda or budgets.get("device") or free_device):
        placement = place_blocks(sh, run, runtime, budgets.get("device") or free_device,
                                 budgets.get("host") or free_host_bytes() or 2 ** 62, cuda)
        run = dataclasses.replace(run, device_blocks=placement.device if cuda else 0, disk_blocks=placement.disk)
    phases = memory(sh, run, cuda, runtime)
    notes = [f"offload: {placement.words()} (from the memory budgets)"] if placement else []
    if sh.grouped_by != "meta forward":
        notes.append(f"shared inputs not found by a meta forward: {sh.grouped_by}")
    if bench and (not cuda or has_cuda):
        timing(phases, sh, run, microbenchmark(config, sh, run, dev))
        notes.append("load time is a host memory copy of the weights: reading the disk (and a GGUF's first "
                     "dequantization) comes on top")
        if cuda:
            from ..lowrank.scalings import eigh_on_host

            widest = max(sh.groups)
            notes.append(f"float64 eigendecompositions {widest} wide run on the " + (
                "host CPU, measured faster than this GPU at float64" if eigh_on_host(dev, widest)
                else "GPU (measured faster than the host CPU)") + " (placed by width: scalings.eigh_rates)")
    elif bench:
        notes.append("no CUDA device here: memory is predicted, time is not")
    plan = Plan(model, str(dev), run.flat(), phases, dataclasses.asdict(sh), runtime, notes, shape=sh, run=run)
    plan.free_host_bytes, plan.free_device_bytes = free_host_bytes(), free_device
    plan.free_disk_bytes = shutil.disk_usage(cache_dir()).free
    plan.placement = placement
    plan.device_runtime_bytes = DEVICE_RUNTIME if cuda else 0
    check_budgets(plan, budgets)
    return plan


class BudgetError(DipSVDError):
    """A memory budget that cannot hold one decoder block (check_budgets)."""


def check_budgets(plan: Plan, budgets: dict) -> None:
    """Put the given budgets in place of the free memory, after checking that each holds one decoder block's
    weights (the least any placement needs: one block on the device, and on the host beside the runtime)."""
    block = plan.shape.block_params * DTYPE_BYTES[plan.run.dtype]
    for what, option, least in (("device", "--device-memory", block), ("host", "--host-memory", block + plan.runtime_bytes)):
        budget = budgets.get(what)
        if budget is None:
            continue
        if budget < least:
            beside = " beside the runtime" if what == "host" else ""
            raise BudgetError(f"{option} {binary_size(budget, 2)} cannot hold one decoder block of this model "
                              f"({binary_size(least, 2)} in {plan.run.dtype}{beside}); give at least that")
        setattr(plan, f"free_{what}_bytes", budget)
        plan.notes.append(f"{what} memory: the budget {option} {_gb(budget)}, not what is free now")


SIZE_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
              "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}


def binary_size(n: float, gib_digits: int = 1) -> str:
    """Bytes in the largest binary unit, up to GiB, in which they are at least 1 (a 1KiB budget is not "0.0 MiB");
    memory_size reads it back."""
    for unit, size, digits in (("GiB", GiB, gib_digits), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f} B"


def memory_size(text: str) -> int:
    """A memory size such as 24GiB, 22GB, 512MiB or 1.5TiB, in bytes (a bare number is bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if m is None:
        raise DipSVDError(f"expected a memory size like 24GiB, 22GB or 512MiB, got '{text}'")
    value = float(m.group(1)) * SIZE_UNITS[m.group(2) or ""]
    if value < 1:
        raise DipSVDError(f"expected a positive memory size, got '{text}'")
    return int(value)


def _misfit(plan: Plan, margin: float = 1.0) -> str | None:
    """What does not fit, in words, or None."""
    for what, need, free in (("host memory", plan.peak_host_bytes, plan.free_host_bytes),
                             ("device memory", plan.peak_device_bytes, plan.free_device_bytes),
                             ("disk in the cache folder", plan.disk_bytes, plan.free_disk_bytes)):
        if free is not None and need > free * margin:
            return f"predicted peak {what} {_gb(need)}, {_gb(free)} free"
    return None


def check_fits(plan: Plan) -> None:
    """Raise a DipSVDError naming the one option that would fit, when the plan does not."""
    problem = _misfit(plan)
    if problem is None:
        return
    run = plan.run
    cuda = plan.device.startswith("cuda")
    shapes = plan.shape
    tries = []
    for n in (run.calib_windows // 2, run.calib_windows // 4, run.calib_windows // 8):
        if n >= 1:
            tries.append((f"--calib-windows {n}", dataclasses.replace(run, calib_windows=n)))
    for t in (run.seqlen // 2, run.seqlen // 4):
        if t >= 64:
            tries.append((f"--seqlen {t}", dataclasses.replace(run, seqlen=t)))
    if run.compute_dtype == "float64":
        tries.append(("--compute-dtype float32", run.replace(compute_dtype="float32")))
    if not run.offload:  # on a GPU every block streamed, on the CPU every block on disk: the least it holds
        tries.append(("--offload", dataclasses.replace(run, offload=True, disk_blocks=0 if cuda else shapes.n_blocks)))
    if run.factor_dtype == "float32":
        tries.append(("--factor-dtype bfloat16", run.replace(factor_dtype="bfloat16")))
    for option, other in tries:
        alt = dataclasses.replace(plan, phases=memory(shapes, other, cuda, plan.runtime_bytes))
        if _misfit(alt) is None:
            raise DipSVDError(f"this run does not fit: {problem}. {option} would fit "
                              "(or pass --ignore-plan to run anyway)")
    raise DipSVDError(f"this run does not fit: {problem}, and no single option makes it fit; use a machine with "
                      "more memory or a smaller model (or pass --ignore-plan to run anyway)")


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1, default=str)
