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
- Fisher (fisher.fisher_info, block by block): the weights, the kept blocks' inputs for every window
  (every block's up to fisher.FISHER_KEEP_BYTES, else every sqrt(L)-th block's and one recomputed segment),
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
import shutil
from dataclasses import dataclass, field

import torch

from ..common.errors import DipSVDError
from ..model.offload import block_device_map
from ..refine.choices import DISTILL_SCOPES
from .memory import Placement, free_device_bytes, free_host_bytes, memory, place_blocks, run_overhead, runtime_bytes
from .shapes import (DEVICE_RUNTIME, DTYPE_BYTES, GiB, Phase, Run, Shapes, binary_size, load_config,  # noqa: F401
                     memory_size, meta_model, shapes_of)
from .timing import microbenchmark, timing


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
                "placement": None if self.placement is None else  # its counts; the device map is for the loader
                {k: v for k, v in dataclasses.asdict(self.placement).items() if k != "device_map"}}

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


def make_plan(model: str, device: str | None = None, run: Run = Run(), bench: bool = True,
              trust_remote_code: bool = False, budgets: dict | None = None, measure_rates: bool = False) -> Plan:
    """The plan for compressing `model` with these settings on `device` (auto: CUDA when present).
    `device="cuda"` on a machine without CUDA plans the memory only (no time, no free memory). `budgets`
    ({"device": bytes, "host": bytes}, None for what is free now) replace the free memory the plan is checked
    against (check_fits); one smaller than a decoder block's weights is refused at once (`check_budgets`). With
    `measure_rates`, the eigendecompositions at this model's widths are timed on the device first and stored for it
    (plan.rates), so that this plan and later ones read their times from them."""
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
    meta = meta_model(config, trust_remote_code)  # the module tree, no weights: the shapes and the device map
    sh = shapes_of(config, trust_remote_code, from_gguf, meta)
    runtime += run_overhead(sh)
    budgets = budgets or {}
    free_device = free_device_bytes(dev) if cuda and has_cuda else None
    placement = None
    if run.offload and (not cuda or budgets.get("device") or free_device):
        placement = place_blocks(sh, run, runtime, budgets.get("device") or free_device,
                                 budgets.get("host") or free_host_bytes() or 2 ** 62, cuda)
        run = dataclasses.replace(run, device_blocks=placement.device if cuda else 0, disk_blocks=placement.disk)
        placement = dataclasses.replace(placement, device_map=tuple(block_device_map(
            meta, dev, placement.device, placement.host).items()))
    phases = memory(sh, run, cuda, runtime)
    notes = _offload_notes(placement, run) if placement else []
    if sh.grouped_by != "meta forward":
        notes.append(f"shared inputs not found by a meta forward: {sh.grouped_by}")
    if bench and (not cuda or has_cuda):
        if measure_rates:
            _measure_rates(dev, sh, run)
        rates = microbenchmark(config, sh, run, dev)
        timing(phases, sh, run, rates)
        notes.append(f"times from this device's rates: the block pass, matmuls and copies measured now; {rates.words}"
                     + ("" if measure_rates or "cubed" not in rates.words else
                        " (`plan --measure-rates` times them at these widths once and stores them for this device)"))
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
    shown = {k: v for k, v in dataclasses.asdict(sh).items() if k != "names"}  # the module names stay out of the JSON
    plan = Plan(model, str(dev), run.flat(), phases, shown, runtime, notes, shape=sh, run=run)
    plan.free_host_bytes, plan.free_device_bytes = free_host_bytes(), free_device
    plan.free_disk_bytes = shutil.disk_usage(cache_dir()).free
    plan.placement = placement
    plan.device_runtime_bytes = DEVICE_RUNTIME if cuda else 0
    check_budgets(plan, budgets)
    return plan


def _offload_notes(placement: Placement, run: Run) -> list[str]:
    """The placement in words, and what it changes: block tuning's offloaded blocks train their factors and norms."""
    from ..refine.choices import refine_choice

    notes = [f"offload: {placement.words()} (from the memory budgets)"]
    streamed = placement.disk + (placement.host if placement.gpu else 0)
    if streamed and refine_choice(run.refine).tunes and run.tune.scope == "block":
        held = placement.device + (0 if placement.gpu else placement.host)
        notes.append(f"block tuning: the {streamed} offloaded blocks train their low-rank factors and norms, not "
                     f"their dense matrices (tuned, those would be held on the device); the {held} held blocks train "
                     "every parameter")
    return notes


def _measure_rates(dev: torch.device, sh: Shapes, run: Run) -> None:
    """Time the eigendecompositions at this model's widths on `dev` (and its host) and store them (plan.rates)."""
    from ..model.models import DTYPES
    from .rates import device_name, measure_factorings, store

    measured = measure_factorings(dev, sh.eigh_widths, (DTYPES.get(run.compute_dtype, torch.float64),))
    store(device_name(dev), measured["eigh_s"], "plan --measure-rates")


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


def misfit(plan: Plan, margin: float = 1.0) -> str | None:
    """What does not fit, in words, or None."""
    for what, need, free in (("host memory", plan.peak_host_bytes, plan.free_host_bytes),
                             ("device memory", plan.peak_device_bytes, plan.free_device_bytes),
                             ("disk in the cache folder", plan.disk_bytes, plan.free_disk_bytes)):
        if free is not None and need > free * margin:
            return f"predicted peak {what} {_gb(need)}, {_gb(free)} free"
    return None


def _single_options(run: Run, cuda: bool, n_blocks: int) -> list[tuple[str, Run]]:
    """The options check_fits tries one at a time, the one that costs least first: distillation's recomputed
    activations (time only) and its norms alone, then less calibration, float32 compute, offload (not for a run that
    distils: distillation refuses an offloaded model) and bfloat16 factors."""
    tries = []
    if run.distill.epochs and not run.distill.recompute:
        tries.append(("--distill-recompute", run.replace(distill=dataclasses.replace(run.distill, recompute=True))))
    if run.distill.epochs and DISTILL_SCOPES[run.distill.scope].factors:
        tries.append(("--distill-scope norms", run.replace(distill=dataclasses.replace(run.distill, scope="norms"))))
    for n in (run.calib_windows // 2, run.calib_windows // 4, run.calib_windows // 8):
        if n >= 1:
            tries.append((f"--calib-windows {n}", dataclasses.replace(run, calib_windows=n)))
    for t in (run.seqlen // 2, run.seqlen // 4):
        if t >= 64:
            tries.append((f"--seqlen {t}", dataclasses.replace(run, seqlen=t)))
    if run.compute_dtype == "float64":
        tries.append(("--compute-dtype float32", run.replace(compute_dtype="float32")))
    if not run.offload and not run.distill.epochs:  # on a GPU every block streamed, on the CPU every block on disk
        tries.append(("--offload", dataclasses.replace(run, offload=True, disk_blocks=0 if cuda else n_blocks)))
    if run.factor_dtype == "float32":
        tries.append(("--factor-dtype bfloat16", run.replace(factor_dtype="bfloat16")))
    return tries


def check_fits(plan: Plan, override: str = "pass --ignore-plan") -> None:
    """Raise a DipSVDError naming the one option that would fit, when the plan does not; `override` says how to run
    anyway (the CLI's flag by default)."""
    problem = misfit(plan)
    if problem is None:
        return
    cuda = plan.device.startswith("cuda")
    shapes = plan.shape
    for option, other in _single_options(plan.run, cuda, shapes.n_blocks):
        alt = dataclasses.replace(plan, phases=memory(shapes, other, cuda, plan.runtime_bytes))
        if misfit(alt) is None:
            raise DipSVDError(f"this run does not fit: {problem}. {option} would fit "
                              f"(or {override} to run anyway)")
    raise DipSVDError(f"this run does not fit: {problem}, and no single option makes it fit; use a machine with "
                      f"more memory or a smaller model (or {override} to run anyway)")


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1, default=str)
