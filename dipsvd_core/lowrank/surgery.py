"""Step 5 of the flow: build the compressed model. The original is never modified.

Math and surgery are separate: `low_rank_weights` turns factors and ranks into a mapping of
(u, v) tensors (k rows of each factor, read from disk when asked for, so that surgery holds one
matrix's factors on the host at a time); `compress_model` builds a second module tree
that shares every tensor it does not change with the original (embeddings, norms, lm_head, biases,
buffers and every matrix kept dense: the same storage, no copy) and swaps each factored Linear for
a LowRankLinear (x -> v -> u, u keeps the bias; one module call, the two products taken functionally). Pairs that
read the same input (q/k/v; gate/up, found by the input's identity in one forward) are then fused: their v factors
stacked in one tensor that is each v weight's storage, so one product serves the group (fuse_siblings); the state
dict is unchanged. Original plus compressed in memory is then the
original plus the kept factors. Nothing writes into a shared tensor: the compressed model is for
inference and saving, like the original.

`compress_model(..., inplace=True)` converts the original itself instead, dropping each dense matrix
as its factors replace it: batch runs that never look at the original again (`compress
--no-eval-original`) then peak at the original, not the original plus the kept factors. A model loaded
from safetensors on the CPU keeps its weights in a memory map of the file, which stays mapped while
any weight of that file lives; freeing one matrix then does not shrink the process, so its pages are
dropped explicitly (`_drop_file_pages`, when nothing else holds the matrix).
"""
from __future__ import annotations

import copy
import ctypes
import itertools
import mmap
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..model.models import shared_inputs
from ..model.offload import offload_hooks, weights_of
from .factors import Factor


def _wrap_linear(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear over these tensors, built without nn.Linear.__init__ (which initialises a weight at random)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight)
    lin.register_parameter("bias", bias)
    return lin


def _plain(m: nn.Module) -> bool:
    """An nn.Linear with no hooks: its product can be taken functionally (a LoRA wrapper or a hooked factor is
    called as a module instead)."""
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


class Siblings:
    """LowRankLinear pairs that read the same input (q/k/v; gate/up): their v factors stacked in one tensor, which
    is the storage of each member's v weight (a view of its rows), so that one product x @ stack^T serves them
    all. The first member called with x computes it; the others take their slices; the last frees it. Not a
    module: nothing of it is saved, and a copy of the model (deepcopy) drops it (its members compute alone)."""

    def __init__(self, stack: torch.Tensor, members: list):
        self.stack, self.members = stack, members
        self.x = self.z = None
        self.left = 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x:  # a new input (held while the members read it, so its identity is not reused)
            self.x, self.z, self.left = x, F.linear(x, self.stack), len(self.members)
        z = self.z
        self.left -= 1
        if self.left <= 0:
            self.x = self.z = None
        return z

    def holds(self, weight: torch.Tensor, lo: int) -> bool:
        """Whether `weight` is still the view of rows lo.. of the stack (not replaced, moved or cast)."""
        s = self.stack
        return (weight.device == s.device and weight.dtype == s.dtype
                and weight.data_ptr() == s.data_ptr() + lo * s.stride(0) * s.element_size())

    def __deepcopy__(self, memo):
        return None


class LowRankLinear(nn.Module):
    """y = u(v(x)) with v: in -> rank (no bias) and u: rank -> out (keeps the original bias).

    One module call per pair: the forward takes the two products functionally (the submodules u and v hold the
    parameters, so the state-dict names stay `u.weight`, `v.weight`, `u.bias`). A fused member (`siblings`) takes
    its input-side product as a slice of its group's one product, in inference (no gradient wanted for v)."""

    siblings: Siblings | None = None
    lo = hi = 0

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_weights(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Wrap existing tensors: no random initialisation, not even on the meta device (for 210 matrices that
        took 0.06 s, a sixth of a build's surgery)."""
        lr = cls.__new__(cls)
        nn.Module.__init__(lr)
        lr.in_features, lr.out_features, lr.rank = v.shape[1], u.shape[0], u.shape[1]
        lr.v = _wrap_linear(v, None)
        if bias is not None and not isinstance(bias, nn.Parameter):  # the original's bias, shared
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        lr.u = _wrap_linear(u, bias)
        return lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.u, self.v
        if not (_plain(u) and _plain(v)):  # wrapped (peft's LoRA) or hooked: call them
            return u(v(x))
        s = self.siblings
        if s is not None and not (torch.is_grad_enabled() and v.weight.requires_grad):
            z = s.product(x)[..., self.lo:self.hi]
        else:
            z = F.linear(x, v.weight)
        return F.linear(z, u.weight, u.bias)

    def _apply(self, fn, recurse=True):
        """A move or cast that gives v a new tensor leaves the group (the stack would be stale): this member then
        computes alone, which is correct; fuse_siblings again to fuse on the new device."""
        out = super()._apply(fn, recurse)
        if self.siblings is not None and not self.siblings.holds(self.v.weight, self.lo):
            self.siblings = None
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def fuse_siblings(model: nn.Module, groups: list[list[str]]) -> int:
    """Stack the v factors of each group's LowRankLinear members (names that read the same input, from
    models.shared_inputs or a saved folder's entry) into one tensor that becomes their storage: each v weight is
    then a view of its rows, so the memory is the same as before (the separate tensors are freed as their views
    replace them; the peak is one group's v factors more). Members on different devices or dtypes, on meta, or not
    plain Linears are left alone; returns the number of groups fused."""
    fused = 0
    for names in groups:
        mods = [model.get_submodule(n) for n in names]
        pairs = [m for m in mods if isinstance(m, LowRankLinear) and _plain(m.v) and m.siblings is None]
        kinds = {(m.v.weight.device, m.v.weight.dtype, m.in_features) for m in pairs}
        if len(pairs) < 2 or len(kinds) > 1 or next(iter(kinds))[0].type == "meta":
            continue
        stack = torch.cat([m.v.weight.detach() for m in pairs])
        group, lo = Siblings(stack, pairs), 0
        for m in pairs:
            m.v.weight = nn.Parameter(stack[lo: lo + m.rank], requires_grad=m.v.weight.requires_grad)
            m.siblings, m.lo, m.hi = group, lo, lo + m.rank
            lo += m.rank
        fused += 1
    return fused


def unfuse_siblings(model: nn.Module) -> list[list[str]]:
    """Give each fused member's v weight its own storage again, group by group (so the peak is one group's v
    factors more), and return the groups' names (for fuse_siblings afterwards, and for a saved folder's entry)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    groups = {id(m.siblings): m.siblings for m in names if m.siblings is not None}
    out = []
    for group in groups.values():
        for m in group.members:
            if m.siblings is group:
                m.v.weight = nn.Parameter(m.v.weight.detach().clone(), requires_grad=m.v.weight.requires_grad)
                m.siblings = None
        out.append([names[m] for m in group.members if m in names])
        group.stack = None
    return out


def fuse_model(model: nn.Module, groups: list[list[str]] | None = None) -> int:
    """Ready `model`'s pairs for inference: fuse its siblings (the given groups, or those found by one forward,
    models.shared_inputs) and store its u factors column-major where that pays (lay_out_pairs)."""
    if groups is None:
        groups = shared_inputs(model, [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)])
    fused = fuse_siblings(model, groups)
    lay_out_pairs(model)
    return fused


def column_major(w: torch.Tensor) -> bool:
    """Whether a 2-D tensor is stored column by column (the transpose of a row-major one)."""
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


@torch.no_grad()
def lay_out_pairs(model: nn.Module, inference: bool = True) -> int:
    """Store each plain pair's u factor (out x rank, out > rank) column-major on the CPU in float32: the same
    tensor, values and state-dict entry, its memory the transpose. A decode step's z -> u z is then `rank` axpys of
    length `out` instead of `out` dot products of length `rank`, which this project's CPU BLAS runs at 1.1x-1.7x the
    rate for a pair's shapes (bench/RESULTS.md, issue 38). bfloat16 keeps the row-major layout (its CPU kernel runs
    0.7x-0.8x as fast column-major at 8B widths), and so does a GPU (not measured there). With
    `inference=False`, row-major again (for saving: safetensors writes contiguous tensors). One u at a time is
    copied; returns how many were re-laid."""
    count, mappings = 0, _file_mappings()
    for m in model.modules():
        if not (isinstance(m, LowRankLinear) and _plain(m.u)):
            continue
        w = m.u.weight
        if inference and (w.device.type != "cpu" or w.dtype != torch.float32 or column_major(w)
                          or w.shape[0] <= w.shape[1]):
            continue
        if not inference and w.is_contiguous():
            continue
        data = w.detach().T.contiguous().T if inference else w.detach().contiguous()
        m.u.weight = nn.Parameter(data, requires_grad=w.requires_grad)
        _drop_file_pages(w, mappings)  # loaded from safetensors: the old layout's pages of the mapped file go
        del w
        count += 1
    return count


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory maps of .safetensors files (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = [ln.split() for ln in f]
    except OSError:
        return []
    out = []
    for parts in lines:
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def _drop_file_pages(weight: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Release the pages of a CPU weight that lies in a read-only file map and that nothing else holds
    (the caller's reference and this storage handle only); returns the bytes released. The pages are
    file-backed and never written, so a later read would fault them back in from the file: safe."""
    if weight.device.type != "cpu" or not mappings:
        return 0
    storage = weight.untyped_storage()
    if torch._C._storage_Use_Count(storage._cdata) > 2:  # a view or another tensor shares it
        return 0
    ptr, n = storage.data_ptr(), storage.nbytes()
    if not any(a <= ptr and ptr + n <= b for a, b in mappings):
        return 0
    page = mmap.PAGESIZE
    lo, hi = -(-ptr // page) * page, (ptr + n) // page * page
    if hi <= lo:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return hi - lo if libc.madvise(lo, hi - lo, 4) == 0 else 0  # 4 = MADV_DONTNEED


class LowRankWeights(Mapping):
    """name -> (u, v) for every factored matrix (dense ones are left out), each read when asked for."""

    def __init__(self, factors: dict[str, Factor], ranks: dict[str, int | None]):
        self.factors, self.ranks = factors, {n: k for n, k in ranks.items() if k is not None}

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors[name].low_rank(self.ranks[name])

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)


def low_rank_weights(factors: dict[str, Factor], ranks: dict[str, int | None]) -> LowRankWeights:
    return LowRankWeights(factors, ranks)


def placement_of(linear: nn.Linear) -> tuple[torch.device, nn.Parameter | None]:
    """Where a low-rank pair in place of `linear` computes, and the bias it keeps: the Linear's device, or for one
    offloaded by accelerate (its weight on meta) its hook's execution device and a copy of its bias there."""
    hook = getattr(linear, "_hf_hook", None)
    if hook is None or getattr(hook, "execution_device", None) is None:
        return linear.weight.device, linear.bias
    dev, bias = torch.device(hook.execution_device), None
    if linear.bias is not None:
        with weights_of(linear):
            bias = nn.Parameter(linear.bias.detach().to(dev).clone(), requires_grad=False)
    return dev, bias


class _Overlay(Mapping):
    """An offload hook's weights map with some of its tensors replaced (an offloaded norm that block tuning trained):
    the new ones from `new`, the others from the map it overlays, which the original model's hooks still read."""

    def __init__(self, base: Mapping, new: dict):
        self.base, self.new = base, new

    def __getitem__(self, key):
        return self.new[key] if key in self.new else self.base[key]

    def __iter__(self):
        return iter(self.base.keys())

    def __len__(self) -> int:
        return len(self.base)


def _replace_parameter(new: nn.Module, mods: dict, path: str, value: torch.Tensor) -> None:
    """The parameter at `path` (module.name) of `new` replaced by a new one holding `value`, in the old one's dtype
    and place; the original's parameter is left as it was (`new` is a copy whose modules are its own). A Linear's
    weight makes a new Linear (so an offloaded one computes on its hook's device with no offloading); another
    offloaded module's parameter (a norm's) stays offloaded: the copy's hooks read the new value (_Overlay)."""
    module_name, _, pname = path.rpartition(".")
    old = mods[module_name]
    if isinstance(old, nn.Linear) and pname == "weight":
        dev, bias = placement_of(old)
        set_module(new, module_name, _wrap_linear(value.to(dev, old.weight.dtype), bias))
        return
    target = new.get_submodule(module_name)
    if offload_hooks(old):  # the copy's own hooks read the new value from host memory, the rest from the shared map
        for h in offload_hooks(target):
            h.weights_map = _Overlay(h.weights_map, {pname: value.detach().to("cpu", getattr(old, pname).dtype)})
        return
    ref = getattr(target, pname)
    setattr(target, pname, nn.Parameter(value.to(ref.device, ref.dtype), requires_grad=False))


def compress_model(model: nn.Module, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
                   inplace: bool = False, fuse: bool = True) -> nn.Module:
    """`model` with each named Linear replaced by LowRankLinear(u, v), as a new module tree over the
    original's tensors: the original is unchanged and nothing but the factors is allocated. An entry whose value
    is one tensor is a parameter's path (`...down_proj.weight`, `...input_layernorm.weight`) and its refitted value
    (refine's dense compensation and block tuning): that parameter alone is new in the copy. With
    `inplace`, `model` itself is converted (and returned), each dense matrix freed as it goes. With `fuse`, the
    pairs that read the same input then share one input-side product (fuse_model)."""
    mods = dict(model.named_modules())
    mappings = _file_mappings() if inplace else []
    if inplace:
        new = model
    else:  # deepcopy copies the modules; a memo entry that maps a tensor to itself makes the copy share it.
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        for m in model.modules():  # offloaded: the copy's hooks read the same host and disk weights
            for h in offload_hooks(m):
                memo[id(h.weights_map)] = h.weights_map
        new = copy.deepcopy(model, memo)
    for name in weights:
        value = weights[name]  # read now: one matrix's factors at a time
        if isinstance(value, torch.Tensor):  # a refitted dense parameter (refine's compensation or block tuning)
            _replace_parameter(new, mods, name, value)
            continue
        u, v = value
        old = mods[name]
        dev, bias = placement_of(old)
        dt = old.weight.dtype
        set_module(new, name, LowRankLinear.from_weights(u.to(dev, dt), v.to(dev, dt), bias))
        del u, v, value
        if inplace:
            w = old.weight
            del old, mods[name]
            _drop_file_pages(w, mappings)
            del w
        else:
            del old, mods[name]
    if fuse:
        fuse_model(new)
    return new


def module_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def densify(model: nn.Module) -> int:
    """Write each LowRankLinear's product u v back into an ordinary Linear, in place and one matrix at a time (each
    pair freed as its product replaces it), for tools that run no custom code; returns how many were turned back.
    The model is then as large as a dense one: this saves no memory, only the compression's error is kept."""
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name in names:
        lr = model.get_submodule(name)
        weight = (lr.u.weight.double() @ lr.v.weight.double()).to(lr.u.weight.dtype)
        set_module(model, name, _wrap_linear(weight, lr.u.bias))
        del lr
    return len(names)
