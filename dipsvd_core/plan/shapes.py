"""What a plan reads and counts in: the phases and the byte constants, a model's config read without its weights
(load_config, meta_model), the shapes of its targeted Linears and input groups (Shapes), and the run planned
(Run: the settings and how the run holds its data)."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..allocation.probes import PROBES
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..engine.data import DEFAULT_CALIB, self_windows
from ..methods.handlers import handler, needs
from ..methods.settings import Settings
from ..model.blocks import Target

def probe_groups_of(sh: Shapes) -> dict[str, list[list[Target]]]:
    """Each registered probe's groups (allocation.probes), by its pass, as lists of the plan's targets."""
    targets = sh.targets()
    by_name = {t.name: t for t in targets}
    return {p.step: [[by_name[n] for n in g] for g in p.groups(targets)[0]] for p in PROBES.values()}


def per_phase(table: dict):
    """The decorator that registers one function per phase into `table` (plan.memory's costs, plan.timing's
    seconds): `@of(phase)` above the function."""
    def of(phase: str):
        def register(f):
            table[phase] = f
            return f
        return register
    return of


# every pass of engine.passes has its phase (the Gram whitening is counted in the statistics phase; each registered
# probe, allocation.probes, is its own), between loading and the build's surgery and evaluation, which every run has
def phases_in_order() -> tuple[str, ...]:
    """Every phase of a plan, in run order (a probe registered later is in it too)."""
    first = (P.WRITING, P.STATISTICS, P.FACTORS, P.FISHER)
    rest = [p for p in P.PASSES if P.PHASE[p] == p and p not in first and p != P.DISTILL]
    return ("load", *first, *rest, "surgery", P.DISTILL, "evaluation", "save")


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
    names: list[str] = field(default_factory=list)  # the module name of each of `matrices` (what a probe groups by)
    kv_width: int = 0  # a token's keys (or values) in one block: key/value heads x head width; 0: the hidden width

    def targets(self) -> list[Target]:
        """`matrices` as the model's targets (model.blocks.Target), for what groups them by name (the probes)."""
        return [Target(n, b, o, i, False) for n, (b, o, i) in zip(self.names, self.matrices)]

    def mapped(self, run) -> bool:
        """Whether loading for `run` on the CPU maps the saved weights instead of copying them: safetensors read at
        the dtype they are stored in stay pages of the file, resident as they are first read (by the first pass),
        not at load (measured: 438 MB after loading a 2-block model of 267 MB of weights, 773 MB after one forward)."""
        return not self.from_gguf and self.stored_dtype == run.dtype

    @property
    def targeted(self) -> int:
        return sum(o * i for _, o, i in self.matrices)

    @property
    def eigh_widths(self) -> list[int]:
        """The widths of the eigendecompositions a run takes: each input group's (the whitening), the hidden one
        (the block output's spectrum) and each matrix's smaller side (its factors)."""
        return sorted({*self.groups, self.hidden, *(min(o, i) for _, o, i in self.matrices)})


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


def shapes_of(config, trust_remote_code: bool = False, from_gguf: bool = False,
              model: nn.Module | None = None) -> Shapes:
    """The shapes of the model of `config`, read from its meta module tree (`model`, made here where not given)."""
    from ..model.blocks import find_blocks, find_targets
    from ..model.models import count_params

    model = model if model is not None else meta_model(config, trust_remote_code)
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
    head_width = int(getattr(config, "head_dim", 0) or hidden // heads)
    kv_width = int(getattr(config, "num_key_value_heads", 0) or heads) * head_width
    vocab = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    return Shapes(len(blocks), hidden, vocab, heads, count_params(model), block_params,
                  [(t.block, t.out_features, t.in_features) for t in targets], groups, widest, from_gguf, grouped_by,
                  stored, [t.name for t in targets], kv_width)


@dataclass(frozen=True)
class Run:
    """What a plan depends on: the compression's own settings (settings.py, whose needs give the phases) and how
    the run is carried out."""

    settings: Settings = field(default_factory=Settings)
    calib: str = DEFAULT_CALIB  # the calibration source: one that the model writes itself adds the writing phase
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
        writes = frozenset((P.WRITING,) if self_windows(self.calib, self.calib_windows) or self.own_text else ())
        return P.phases(needs(self.settings)) | frozenset(ALWAYS) | frozenset(("save",) if self.save else ()) | writes

    @property
    def own_text(self) -> int:
        """The windows of its own text the model writes for distillation to train on (none when it does not distil)."""
        return self.distill.own_text if self.distill.epochs else 0

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
    """A Run from flat fields: the settings' fields go into its settings, the others are the run's own. An allocation
    or refine not given is the method's own, as in Settings (run_of(method="svd-llm") plans uniform, unrefined). A
    distilled build keeps the original as its teacher, so `inplace` not given is then false, as compress builds it."""
    own = {f.name for f in dataclasses.fields(Run)}
    settings = Settings(**{k: v for k, v in fields.items() if k not in own})
    return Run(settings=settings, **{"inplace": not settings.distill.epochs,
                                     **{k: v for k, v in fields.items() if k in own}})


@dataclass
class Phase:
    host_bytes: int
    device_bytes: int
    disk_bytes: int
    seconds: float | None
    needed: bool = True


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
