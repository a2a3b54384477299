"""A saved compressed folder that plain transformers loads, without this project, and that no tool takes for the
dense base model (Hugging Face's custom-code convention): `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`.

config.json names a model type of ours, `dipsvd_<base model type>` (`dipsvd_llama`), and the architecture
`DipSVDForCausalLM`; the base's own model type and architectures are kept in the `dipsvd_compression` entry
(`base`). transformers knows no such model type, so it finds the classes only through config.json's `auto_map`
(AutoConfig, AutoModel, AutoModelForCausalLM), which is custom code: without `trust_remote_code=True` it refuses
and its message names the flag, instead of building a dense Llama with random weights where the low-rank pairs
are. Inference servers that pick a native class from `architectures` do not find one either.

`write_code_files` puts two small files into the folder: `configuration_dipsvd.py`, the base's configuration
class under our model type, and `modeling_dipsvd.py`, the base's classes (for example LlamaModel and
LlamaForCausalLM, imported from transformers) whose constructors swap each compressed Linear for a low-rank pair
of the rank config.json lists, with the parameter names this project saves (`<name>.v.weight`, `<name>.u.weight`,
`<name>.u.bias`), and that fuse the pairs the entry's `siblings` lists when the model enters evaluation mode.
transformers builds them on the meta device and assigns the saved tensors, so the dense weights
are never allocated. A Dobi-SVD model remapped to 8-bit stores int8 factors with scales, which only this
project's loader turns back: its modeling file's classes refuse, saying so (`portable_reason` gives the reason).

`base_config_dict` turns a saved config.json back into the base's, for this project's own loader; folders saved
before this module gave them a model type of their own (config.json still `llama`) read the same way.
"""
from __future__ import annotations

from pathlib import Path

ENTRY = "dipsvd_compression"
MODELING_FILE = "modeling_dipsvd.py"
CONFIG_FILE = "configuration_dipsvd.py"
CLASS_NAME = "DipSVDForCausalLM"
BASE_MODEL_CLASS = "DipSVDModel"
CONFIG_CLASS = "DipSVDConfig"

CONFIG_TEMPLATE = '''"""DipSVD Studio compressed model: {base_config} under its own model type, "{model_type}".

transformers has no class for this model type, so it loads the folder only through config.json's auto_map, with
trust_remote_code=True; without the flag it refuses instead of building a dense {base} with random weights where
the compressed Linears are.
"""
from transformers import {base_config} as _BaseConfig


class {config_cls}(_BaseConfig):
    model_type = "{model_type}"
'''

MODELING_HEAD = '''"""DipSVD Studio compressed model: {base} whose compressed Linears are low-rank pairs y = u(v(x)).

Written by DipSVD Studio next to the weights. Load it with plain transformers:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The ranks come from config.json's "dipsvd_compression" entry ("ranks": module name -> rank, names as in
{cls}). {base_model_cls} is the base model ({base_model}) with the same pairs, for AutoModel. The entry's
"siblings" lists the pairs that read one input (q/k/v; gate/up): in evaluation mode (from_pretrained ends in it)
their v factors are stacked into one tensor that holds each v weight as a view, and one product serves the group.
"""
import ctypes
import mmap

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base} as _Base, {base_model} as _BaseModel

from .configuration_dipsvd import {config_cls}
'''

MODELING_BODY = '''

def _plain(m):
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


class Siblings:
    """Pairs that read one input: their v factors stacked (each member's v weight is a view of its rows)."""

    def __init__(self, stack, members):
        self.stack, self.members, self.x, self.z, self.left = stack, members, None, None, 0

    def product(self, x):
        if self.x is not x:
            self.x, self.z, self.left = x, F.linear(x, self.stack), len(self.members)
        z = self.z
        self.left -= 1
        if self.left <= 0:
            self.x = self.z = None
        return z

    def holds(self, weight, lo):
        s = self.stack
        return (weight.device == s.device and weight.dtype == s.dtype
                and weight.data_ptr() == s.data_ptr() + lo * s.stride(0) * s.element_size())

    def __deepcopy__(self, memo):
        return None


class LowRankLinear(nn.Module):
    """y = u(v(x)): v maps in_features to rank (no bias), u maps rank to out_features (the original's bias), both
    products taken in this one module call."""

    siblings = None
    lo = hi = 0

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        u, v = self.u, self.v
        if not (_plain(u) and _plain(v)):
            return u(v(x))
        s = self.siblings
        if s is not None and not (torch.is_grad_enabled() and v.weight.requires_grad):
            z = s.product(x)[..., self.lo:self.hi]
        else:
            z = F.linear(x, v.weight)
        return F.linear(z, u.weight, u.bias)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.siblings is not None and not self.siblings.holds(self.v.weight, self.lo):
            self.siblings = None  # moved or cast: computes alone until the model enters eval mode again
        return out

    def extra_repr(self):
        return f"in_features={{self.in_features}}, out_features={{self.out_features}}, rank={{self.rank}}"


def _low_rank(model, ranks, prefix=""):
    """Swap the Linears named in `ranks` (below `prefix`, which is stripped) for LowRankLinear modules."""
    for name, rank in ranks.items():
        if not name.startswith(prefix):
            continue
        parent, _, child = name[len(prefix):].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, child)
        setattr(owner, child, LowRankLinear(old.in_features, old.out_features, int(rank), old.bias is not None,
                                            device=old.weight.device, dtype=old.weight.dtype))


@torch.no_grad()
def _fuse(model, groups, prefix=""):
    """Stack the v factors of each group of pairs (names below `prefix`) that are not fused yet."""
    for names in groups:
        mods = [model.get_submodule(n[len(prefix):]) for n in names if n.startswith(prefix)]
        pairs = [m for m in mods if isinstance(m, LowRankLinear) and _plain(m.v) and m.siblings is None]
        kinds = {{(m.v.weight.device, m.v.weight.dtype) for m in pairs}}
        if len(pairs) < 2 or len(kinds) > 1 or next(iter(kinds))[0].type == "meta":
            continue
        stack = torch.cat([m.v.weight.detach() for m in pairs])
        group, lo = Siblings(stack, pairs), 0
        for m in pairs:
            m.v.weight = nn.Parameter(stack[lo: lo + m.rank], requires_grad=m.v.weight.requires_grad)
            m.siblings, m.lo, m.hi = group, lo, lo + m.rank
            lo += m.rank


{page_helpers}

@torch.no_grad()
def _lay_out(model):
    """Each pair's u factor (out > rank) stored column-major on the CPU in float32, the same values: faster there.
    The old layout's pages of the mapped safetensors file are handed back (Linux): else a loaded folder would hold
    both layouts of every u in memory. Returns the bytes handed back."""
    released, mappings = 0, _file_mappings()
    for m in model.modules():
        if isinstance(m, LowRankLinear) and _plain(m.u):
            w = m.u.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.shape[0] > w.shape[1] and w.is_contiguous():
                m.u.weight = nn.Parameter(w.detach().T.contiguous().T, requires_grad=w.requires_grad)
                released += _drop_file_pages(w, mappings)
    return released


class {base_model_cls}(_BaseModel):
    """{base_model} with the compressed Linears of config.dipsvd_compression["ranks"] as LowRankLinear modules."""

    config_class = {config_cls}

    def __init__(self, config):
        super().__init__(config)
        _low_rank(self, config.dipsvd_compression["ranks"], "{prefix}.")

    def train(self, mode=True):
        out = super().train(mode)
        if not mode:
            _fuse(self, self.config.dipsvd_compression.get("siblings", []), "{prefix}.")
            _lay_out(self)
        return out


class {cls}(_Base):
    """{base} with the compressed Linears of config.dipsvd_compression["ranks"] as LowRankLinear modules."""

    config_class = {config_cls}

    def __init__(self, config):
        super().__init__(config)
        _low_rank(self, config.dipsvd_compression["ranks"])

    def train(self, mode=True):
        out = super().train(mode)
        if not mode:
            _fuse(self, self.config.dipsvd_compression.get("siblings", []))
            _lay_out(self)
        return out
'''

# A remapped Dobi-SVD folder: the same classes refuse, saying why and what loads it.
REFUSING_BODY = '''

REASON = {reason!r}


class {base_model_cls}(_BaseModel):
    config_class = {config_cls}

    def __init__(self, config):
        raise ValueError(f"this folder cannot load in plain transformers: {{REASON}}. Load it with DipSVD Studio: "
                         "python -m dipsvd_core evaluate --model FOLDER, or dipsvd_core.io.compressed.load_compressed")


class {cls}({base_model_cls}):
    pass
'''


def portable_reason(model, entry: dict) -> str | None:
    """Why a folder of `model` cannot load in plain transformers, or None when it can."""
    if entry.get("remap"):
        return "a Dobi-SVD model remapped to 8-bit stores int8 factors that only DipSVD Studio's loader dequantizes"
    return _unexported(model)


def _unexported(model) -> str | None:
    """Why the modeling files cannot import `model`'s classes from transformers, or None when they can."""
    import transformers

    for cls in (type(model), type(model.base_model), type(model.config)):
        if getattr(transformers, cls.__name__, None) is not cls:
            return f"{cls.__name__} is not a class transformers exports, so the modeling file cannot import it"
    return None


def model_type_of(base_type: str) -> str:
    """Our model type for a base model type: `llama` -> `dipsvd_llama`."""
    return f"dipsvd_{base_type}"


def write_code_files(folder: Path, model, reason: str | None = None) -> None:
    """The folder's configuration_dipsvd.py and modeling_dipsvd.py for `model`'s architecture; with a `reason`
    (portable_reason), classes that refuse with it. Nothing is written where transformers does not export the
    base's classes (there is nothing to import)."""
    if _unexported(model) is not None:
        return
    names = dict(base=type(model).__name__, base_model=type(model.base_model).__name__,
                 base_config=type(model.config).__name__, model_type=model_type_of(model.config.model_type),
                 cls=CLASS_NAME, base_model_cls=BASE_MODEL_CLASS, config_cls=CONFIG_CLASS,
                 prefix=model.base_model_prefix, reason=reason)
    Path(folder, CONFIG_FILE).write_text(CONFIG_TEMPLATE.format(**names))
    body = MODELING_BODY if reason is None else REFUSING_BODY
    Path(folder, MODELING_FILE).write_text((MODELING_HEAD + body).format(**names, page_helpers=_page_helpers()))


def _page_helpers() -> str:
    """The source of surgery's file-page helpers, for the modeling file (which imports nothing of this project):
    one definition, as this project's own loader runs it."""
    import inspect

    from ..lowrank import surgery

    return "\n\n".join(inspect.getsource(f) for f in (surgery._file_mappings, surgery._drop_file_pages))


def auto_map() -> dict:
    """config.json's auto_map: AutoConfig, AutoModel and AutoModelForCausalLM point at the folder's code files."""
    modeling, configuration = MODELING_FILE.removesuffix(".py"), CONFIG_FILE.removesuffix(".py")
    return {"AutoConfig": f"{configuration}.{CONFIG_CLASS}", "AutoModel": f"{modeling}.{BASE_MODEL_CLASS}",
            "AutoModelForCausalLM": f"{modeling}.{CLASS_NAME}"}


def saved_config_dict(raw: dict, with_code: bool) -> dict:
    """config.json as save_pretrained wrote it (the base's model type and architectures, our entry) turned into
    the saved folder's: our model type and architecture, the base's kept in the entry, and the auto_map where the
    folder has its code files."""
    out = dict(raw)
    out[ENTRY] = dict(raw[ENTRY], base={"model_type": raw["model_type"], "architectures": raw.get("architectures")})
    out["model_type"] = model_type_of(raw["model_type"])
    out["architectures"] = [CLASS_NAME]
    out.pop("auto_map", None)
    if with_code:
        out["auto_map"] = auto_map()
    return out


def base_config_dict(raw: dict) -> dict:
    """The base architecture's config dict of a saved config.json: its model type and architectures back, no
    auto_map. A folder saved before our model type (config.json `llama`, no `base` in the entry) reads as is."""
    out = {k: v for k, v in raw.items() if k != "auto_map"}
    base = (raw.get(ENTRY) or {}).get("base")
    if base:
        out.update(model_type=base["model_type"], architectures=base["architectures"])
    return out
