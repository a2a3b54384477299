"""A saved compressed folder that plain transformers loads, without this project (Hugging Face's custom-code
convention): `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

`write_modeling_file` puts a small `modeling_dipsvd.py` into the folder: the base architecture's own class (for
example LlamaForCausalLM, imported from transformers) whose constructor swaps each compressed Linear for a
low-rank pair of the rank config.json lists, with the parameter names this project saves (`<name>.v.weight`,
`<name>.u.weight`, `<name>.u.bias`). config.json's `auto_map` points AutoModelForCausalLM at that class, and its
`architectures` keeps the base class, so tools that read it still see the architecture. transformers builds the
class on the meta device and assigns the saved tensors, so the dense weights are never allocated.

A Dobi-SVD model remapped to 8-bit stores int8 factors with scales, which only this project's loader turns back:
such a folder gets no modeling file (`portable` returns the reason).
"""
from __future__ import annotations

from pathlib import Path

MODELING_FILE = "modeling_dipsvd.py"
CLASS_NAME = "DipSVDForCausalLM"

TEMPLATE = '''"""DipSVD Studio compressed model: {base} whose compressed Linears are low-rank pairs y = u(v(x)).

Written by DipSVD Studio next to the weights. Load it with plain transformers:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The ranks come from config.json's "dipsvd_compression" entry ("ranks": module name -> rank).
"""
from torch import nn
from transformers import {base} as _Base


class LowRankLinear(nn.Module):
    """y = u(v(x)): v maps in_features to rank (no bias), u maps rank to out_features (the original's bias)."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.u(self.v(x))

    def extra_repr(self):
        return f"in_features={{self.in_features}}, out_features={{self.out_features}}, rank={{self.rank}}"


class {cls}(_Base):
    """{base} with the compressed Linears of config.dipsvd_compression["ranks"] as LowRankLinear modules."""

    def __init__(self, config):
        super().__init__(config)
        entry = config.dipsvd_compression
        for name, rank in entry["ranks"].items():
            parent, _, child = name.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            old = getattr(owner, child)
            setattr(owner, child, LowRankLinear(old.in_features, old.out_features, int(rank), old.bias is not None,
                                                device=old.weight.device, dtype=old.weight.dtype))
'''


def portable_reason(model, entry: dict) -> str | None:
    """Why a folder of `model` cannot load in plain transformers, or None when it can."""
    import transformers

    base = type(model).__name__
    if entry.get("remap"):
        return "a Dobi-SVD model remapped to 8-bit stores int8 factors that only DipSVD Studio's loader dequantizes"
    if getattr(transformers, base, None) is not type(model):
        return f"{base} is not a class transformers exports, so the modeling file cannot import it"
    return None


def write_modeling_file(folder: Path, model) -> None:
    """The folder's modeling_dipsvd.py for `model`'s architecture (call portable_reason first)."""
    Path(folder, MODELING_FILE).write_text(TEMPLATE.format(base=type(model).__name__, cls=CLASS_NAME))


def auto_map() -> dict:
    """config.json's auto_map entry that points AutoModelForCausalLM at the modeling file's class."""
    return {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{CLASS_NAME}"}
