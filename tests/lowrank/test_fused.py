"""Issue 38: a low-rank pair is one module call (its two products taken functionally), and pairs that read the same
input (q/k/v; gate/up) share one input-side product over their stacked v factors, whose storage holds each v weight
as a view. The logits equal the unfused ones, the state dict is unchanged, and saved folders (with or without the
list of siblings) load fused."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.lowrank.surgery import LowRankLinear, column_major, fuse_siblings, lay_out_pairs, unfuse_siblings
from dipsvd_core.run.pipeline import Settings, Workbench


@pytest.fixture(scope="module")
def built(tiny_lm):
    bench = Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)
    return bench, bench.build(Settings(method="svd-llm", ratio=0.3)).model


def pairs_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def storages(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (a view counts once with its base)."""
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def test_a_pair_is_one_module_call(built):
    bench, model = built
    calls = []
    inner = {id(m.u) for m in pairs_of(model).values()} | {id(m.v) for m in pairs_of(model).values()}
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: calls.append(id(m)))
    try:
        with torch.no_grad():
            model(bench.windows()[:1, :8])
    finally:
        handle.remove()
    assert len(pairs_of(model)) == 14 and not inner & set(calls)  # no call reaches a factor's own module


def test_siblings_share_one_product_and_the_logits_do_not_change(built):
    bench, model = built
    pairs = pairs_of(model)
    groups = {id(m.siblings): [n for n, p in pairs.items() if p.siblings is m.siblings]
              for m in pairs.values() if m.siblings is not None}
    assert sorted(len(g) for g in groups.values()) == [2, 2, 3, 3]  # gate/up and q/k/v of both blocks
    for names in groups.values():  # each v weight is a view of its group's stack, in order
        stack = pairs[names[0]].siblings.stack
        rows = torch.cat([pairs[n].v.weight.detach() for n in names])
        assert torch.equal(rows, stack) and pairs[names[0]].v.weight.data_ptr() == stack.data_ptr()
    keys, fused_bytes = set(model.state_dict()), storages(model)
    ids = bench.windows()[:2, :32]
    with torch.no_grad():
        fused = model(ids).logits
        undone = unfuse_siblings(model)
        plain = model(ids).logits
        assert storages(model) == fused_bytes  # the stack was the storage, not a second copy
        assert fuse_siblings(model, undone) == 4
    assert set(model.state_dict()) == keys and not any("stack" in k for k in keys)  # the saved names, unchanged
    assert torch.allclose(fused, plain, atol=1e-6, rtol=1e-5)


def test_training_and_moves_leave_the_group(built):
    bench, model = built
    q = pairs_of(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, q.in_features)
    want = x @ q.v.weight.detach().T @ q.u.weight.detach().T
    q.v.weight.requires_grad_(True)
    out = q(x)  # gradient wanted for v: the member's own product, so that v receives it
    out.sum().backward()
    assert q.v.weight.grad is not None and torch.allclose(out.detach(), want, atol=1e-5)
    q.v.weight.grad = None
    q.v.weight.requires_grad_(False)
    assert q.siblings is not None
    q.double()  # cast: v is no longer a view of the stack, so the member computes alone
    assert q.siblings is None and torch.allclose(q(x.double()).float(), want, atol=1e-5)
    q.float()


def test_saved_folders_load_fused_with_the_same_logits(built, tiny_lm, tmp_path):
    from tests.io.test_portable import save_the_old_way

    bench, model = built
    ids = bench.windows()[:2, :32]
    with torch.no_grad():
        want = model(ids).logits
    out = save_compressed(model, tmp_path / "new", tiny_lm.tokenizer, {"method": "svd-llm"})
    entry = json.loads((out / "config.json").read_text())["dipsvd_compression"]
    assert sorted(map(len, entry["siblings"])) == [2, 2, 3, 3]
    assert sum(m.siblings is not None for m in pairs_of(model).values()) == 10  # fused again after saving
    save_the_old_way(model, tmp_path / "old", tiny_lm.tokenizer, {"method": "svd-llm"})  # no list: found on load
    for folder in (out, tmp_path / "old"):
        loaded = load_compressed(folder).model
        assert sum(m.siblings is not None for m in pairs_of(loaded).values()) == 10
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, want, atol=1e-6, rtol=1e-5)


def test_u_factors_are_column_major_on_the_cpu_with_the_same_logits(built, tiny_lm, tmp_path):
    """A pair's u (out x rank) is stored column-major for inference on the CPU (its matrix-vector product runs
    faster so); the values, the state dict and the saved files do not change, and saving leaves the layout."""
    bench, model = built
    pairs = pairs_of(model)
    assert all(column_major(m.u.weight) for m in pairs.values()) and not any(
        column_major(m.v.weight) for m in pairs.values())
    ids = bench.windows()[:2, :32]
    with torch.no_grad():
        laid = model(ids).logits
        assert lay_out_pairs(model, inference=False) == len(pairs)
        assert all(m.u.weight.is_contiguous() for m in pairs.values())
        rows = model(ids).logits
        assert lay_out_pairs(model) == len(pairs) and lay_out_pairs(model) == 0  # done once
    assert torch.allclose(laid, rows, atol=1e-6, rtol=1e-5)
    out = save_compressed(model, tmp_path / "saved", tiny_lm.tokenizer, {"method": "svd-llm"})
    assert all(column_major(m.u.weight) for m in pairs.values())  # laid out again after saving
    loaded = pairs_of(load_compressed(out).model)
    assert all(column_major(m.u.weight) for m in loaded.values())
    for name, m in pairs.items():
        assert torch.equal(loaded[name].u.weight, m.u.weight)


def test_bfloat16_pairs_keep_the_row_major_layout():
    """In bfloat16 the CPU's kernel runs a column-major u slower at 8B widths (bench/RESULTS.md, issue 38): left."""
    holder = nn.Sequential(LowRankLinear.from_weights(torch.randn(64, 8).bfloat16(), torch.randn(8, 32).bfloat16(),
                                                      None))
    assert lay_out_pairs(holder) == 0 and holder[0].u.weight.is_contiguous()
    holder.float()
    assert lay_out_pairs(holder) == 1 and column_major(holder[0].u.weight)


def test_laying_out_a_loaded_folder_lets_go_of_the_old_layouts_file_pages(built, tiny_lm, tmp_path, monkeypatch):
    """A folder loaded on the CPU keeps its tensors in the mapped safetensors file; each u copied column-major hands
    the old layout's pages back (surgery._drop_file_pages, as an in-place build does), else they stay resident
    beside the copy: +517 MB on a 1.2 GB folder of SmolLM2-360M's widths (bench/RESULTS.md, issue 39)."""
    from dipsvd_core.lowrank import surgery

    bench, model = built
    out = save_compressed(model, tmp_path / "saved", tiny_lm.tokenizer, {"method": "svd-llm"})
    dropped, real = [], surgery._drop_file_pages
    monkeypatch.setattr(surgery, "_drop_file_pages", lambda w, m: dropped.append((tuple(w.shape), real(w, m))))
    loaded = pairs_of(load_compressed(out).model)
    assert sorted(s for s, _ in dropped) == sorted(tuple(m.u.weight.shape) for m in loaded.values())
    assert sum(b for _, b in dropped) > 0  # pages of the mapped file were handed back
