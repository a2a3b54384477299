"""The offload path on the CPU: a tiny model whose device_map puts one block in CPU memory and one on
disk (accelerate's big-model inference) gives the same statistics, factors, Fisher signals and
compressed model as the same model held in memory."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine.evaluate import perplexity
from dipsvd_core.run.loading import load_model
from dipsvd_core.run.pipeline import Settings, Workbench

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    off = load_model(tiny_model_dir, "cpu", "float32", device_map=DEVICE_MAP)
    ref = load_model(tiny_model_dir, "cpu", "float32")
    return off, ref


def test_the_map_really_offloads(pair):
    off, ref = pair
    assert off.offloaded and not ref.offloaded
    assert off.model.hf_device_map["model.layers.1"] == "disk"
    assert off.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # brought in per call
    assert off.fingerprint == ref.fingerprint  # the cache key reads offloaded weights through the hooks


def test_statistics_factors_and_fisher_match_the_model_in_memory(pair):
    off, ref = pair
    spec = Settings(method="dipsvd").spec
    a, b = Workbench(off, "wiki", 4, 64), Workbench(ref, "wiki", 4, 64)
    fa, fb = a.factors(spec), b.factors(spec)
    for t in ref.targets:
        torch.testing.assert_close(fa[t.name].sigma, fb[t.name].sigma, rtol=1e-9, atol=0)
    np.testing.assert_allclose(a.fisher().per_block, b.fisher().per_block, rtol=1e-6)
    name = ref.targets[-1].name
    torch.testing.assert_close(a.fisher().rows[name], b.fisher().rows[name], rtol=1e-6, atol=0)


def test_compressed_in_place_equals_the_model_in_memory(tiny_model_dir):
    """Both loaded fresh, since an in-place build consumes its model."""
    settings = Settings(method="svd-llm", ratio=0.3)
    off = load_model(tiny_model_dir, "cpu", "float32", device_map=DEVICE_MAP)
    ref = load_model(tiny_model_dir, "cpu", "float32")
    a, b = Workbench(off, "wiki", 4, 64), Workbench(ref, "wiki", 4, 64)
    ev = a.eval_windows("wiki", 512)
    assert perplexity(off.model, ev) == pytest.approx(perplexity(ref.model, ev), rel=1e-9)
    ra, rb = a.build(settings, inplace=True), b.build(settings, inplace=True)
    assert ra.allocation.ranks == rb.allocation.ranks
    assert perplexity(ra.model, ev) == pytest.approx(perplexity(rb.model, ev), rel=1e-6)


@pytest.mark.parametrize("objective", ["ppl", "cosine"])
def test_bayes_on_an_offloaded_model_equals_the_model_in_memory(pair, objective):
    """The search swaps low-rank pairs into the one model; offloaded, they compute on the hooks' execution device
    and every evaluation sends each block once. Same values, same ranks, the model left as it was."""
    off, ref = pair
    settings = Settings(method="svd-llm", allocation="bayes", bo_calls=3, bo_objective=objective)
    a = Workbench(off, "wiki", 4, 64).allocate(settings)
    b = Workbench(ref, "wiki", 4, 64).allocate(settings)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5)
    assert a.ranks == b.ranks
    assert off.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert type(off.model.model.layers[1].mlp.down_proj).__name__ == "Linear"


def test_offload_on_the_cpu_keeps_on_disk_what_the_host_budget_does_not_hold(tiny_model_dir):
    """On the CPU the device is the host: --offload keeps the blocks that --host-memory does not hold beside the
    working set on disk. Without a placement there is still nothing to place."""
    import json

    from dipsvd_core import plan as P

    with pytest.raises(DipSVDError, match="on the CPU there is nothing to offload to"):
        load_model(tiny_model_dir, "cpu", "float32", offload=True)
    config, _ = P.load_config(tiny_model_dir)
    sh, run = P.shapes_of(config), P.run_of(offload=True)
    block = sh.block_params * 4
    all_disk = max(p.host_bytes for p in P.memory(sh, run.replace(disk_blocks=2), False, 0).values() if p.needed)
    none_disk = max(p.host_bytes for p in P.memory(sh, run, False, 0).values() if p.needed)
    assert none_disk - all_disk == block  # 2 blocks on disk, 1 of them in memory at a time
    assert P.place_blocks(sh, run, 0, None, all_disk + block // 2, cuda=False) == P.Placement(0, 0, 2, gpu=False)
    assert P.place_blocks(sh, run, 0, None, none_disk, cuda=False) == P.Placement(2, 0, 0, gpu=False)
    out = subprocess.run([sys.executable, "-m", "dipsvd_core", "plan", "--model", tiny_model_dir, "--device", "cpu",
                          "--offload", "--no-bench", "--json"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout)["placement"] == {"device": 2, "host": 0, "disk": 0, "gpu": False}  # all fit
    lm = load_model(tiny_model_dir, "cpu", "float32", offload=True, blocks=P.Placement(2, 0, 0, gpu=False))
    assert not lm.offloaded  # everything in memory: loaded as usual


def test_refine_matches_the_model_in_memory(pair):
    """Refine swaps forwards on the compressed path (factors in place of a Linear, kept outputs in place of a
    finished attention); over accelerate's offload hooks it gives the same factors, and leaves the hooks as
    they were."""
    from dipsvd_core.refine.sequential import refine

    off, ref = pair
    settings = Settings(method="svd-llm", ratio=0.3)
    a, b = Workbench(off, "wiki", 4, 64), Workbench(ref, "wiki", 4, 64)
    ev = a.eval_windows("wiki", 512)
    before = perplexity(off.model, ev)
    ranks, names = b.allocate(settings).ranks, [t.name for t in ref.targets]
    wa, _ = refine(off.model, names, a.windows(), settings.spec, ranks)
    wb, _ = refine(ref.model, names, b.windows(), settings.spec, ranks)
    assert wa.keys() == wb.keys() and wa
    for n in wb:
        torch.testing.assert_close(wa[n][0] @ wa[n][1], wb[n][0] @ wb[n][1], rtol=1e-5, atol=1e-6)
    assert off.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # still offloaded
    assert perplexity(off.model, ev) == before


def test_block_tuning_on_an_offloaded_model_trains_its_factors_and_norms(pair, tiny_model_dir, monkeypatch,
                                                                          tmp_path):
    """Block tuning's default scope trains every parameter of a block. An offloaded block trains its factors and
    norms but not its dense matrices (tuned, they would stay on the device): also though refine holds the block on
    the device while it tunes (block_on_device suspends the hooks' offloading). Its tuned norms stay offloaded in
    the compressed copy, read from host memory by the copy's own hooks: the copy computes, and saves, as the model
    in memory with the same new weights does, and the original computes as before. The model in memory tunes its dense
    matrices too."""
    from dipsvd_core.io.compressed import save_compressed
    from dipsvd_core.lowrank.surgery import compress_model
    from dipsvd_core.refine.choices import TuneConfig
    from dipsvd_core.refine.contest import Contest

    off = load_model(tiny_model_dir, "cpu", "float32", device_map=dict(DEVICE_MAP, **{"model.layers.0": "disk"}))
    s = Settings(method="svd-llm", ratio=0.4, refine="block", tune=TuneConfig(epochs=3, lr=1e-3))
    trained = []
    tune = Contest.tune

    def recorded(self, start, windows, cfg):
        tuned, extra = tune(self, start, windows, cfg)
        trained.append(sorted(extra))
        return tuned, extra
    monkeypatch.setattr(Contest, "tune", recorded)
    a, b = Workbench(off, "wiki", 8, 64), Workbench(pair[1], "wiki", 8, 64)
    allocation = a.allocate(s)
    dense = "model.layers.0.self_attn.o_proj"
    allocation.ranks[dense] = None  # one dense matrix
    ev = a.eval_windows("wiki", 256)
    before = perplexity(off.model, ev)
    weights, info = a.refine(s, allocation)
    assert trained == [["input_layernorm.weight", "post_attention_layernorm.weight"]] * 2
    assert info["blocks"][0]["choice"] == "tuned" and "model.layers.0.input_layernorm.weight" in weights
    copy = compress_model(off.model, weights)
    expected = perplexity(compress_model(pair[1].model, weights), ev)
    assert perplexity(copy, ev) == pytest.approx(expected, rel=1e-6)
    save_compressed(copy, tmp_path / "tuned", off.tokenizer)  # saved through the hooks: the tuned norms, not the original's
    assert perplexity(load_model(str(tmp_path / "tuned"), "cpu", "float32").model, ev) == pytest.approx(expected,
                                                                                                        rel=1e-6)
    assert perplexity(off.model, ev) == before
    assert off.model.model.layers[0].input_layernorm.weight.device.type == "meta"  # still offloaded
    trained.clear()
    b.refine(s, allocation)
    assert len(trained) == 2 and "self_attn.o_proj.weight" in trained[0]


class _CountingMap:
    """Stands in for an offload hook's weights map and counts the reads: each read is one tensor sent from the
    host or disk to the execution device."""

    def __init__(self, inner, counts: dict, prefix: str):
        self.inner, self.counts, self.prefix = inner, counts, prefix

    def __getitem__(self, key):
        self.counts[f"{self.prefix}.{key}"] = self.counts.get(f"{self.prefix}.{key}", 0) + 1
        return self.inner[key]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __contains__(self, key):
        return key in self.inner


@pytest.fixture
def counted(pair):
    """The offloaded model with every offload hook's reads counted (name -> reads), put back after."""
    from dipsvd_core.model.offload import offload_hooks

    off, _ = pair
    counts, swapped = {}, []
    for name, module in off.model.named_modules():
        for hook in offload_hooks(module):
            swapped.append((hook, hook.weights_map))
            hook.weights_map = _CountingMap(hook.weights_map, counts, name)
    yield off, counts
    for hook, inner in swapped:
        hook.weights_map = inner


def _reads_per_tensor(counts: dict) -> set[int]:
    blocks = {k: v for k, v in counts.items() if ".layers." in k}
    assert blocks  # both blocks are offloaded
    return set(blocks.values())


def test_every_pass_sends_each_offloaded_block_once_for_all_windows(counted, pair):
    """Over 4 windows, accelerate's hooks alone would send every block tensor 4 times per pass (once per call);
    with block_on_device each is sent once per pass, whatever the number of windows. The figures stay those
    of the model in memory."""
    from dipsvd_core.allocation.fisher import fisher_info
    from dipsvd_core.engine.stats import stream_stats

    off, counts = counted
    _, ref = pair
    windows = Workbench(ref, "wiki", 4, 64).windows()
    names = [t.name for t in ref.targets]
    sa, sb = stream_stats(off.model, names, windows), stream_stats(ref.model, names, windows)
    assert _reads_per_tensor(counts) == {1}
    for g in sb.alphas:
        torch.testing.assert_close(sa.alphas[g], sb.alphas[g], rtol=1e-9, atol=0)
    counts.clear()
    assert perplexity(off.model, windows) == pytest.approx(perplexity(ref.model, windows), rel=1e-6)
    assert _reads_per_tensor(counts) == {1}
    counts.clear()
    fa, fb = fisher_info(off.model, off.targets, windows), fisher_info(ref.model, ref.targets, windows)
    assert _reads_per_tensor(counts) == {2}  # the forward pass and the backward pass
    np.testing.assert_allclose(fa.per_block, fb.per_block, rtol=1e-6)
    counts.clear()
    from dipsvd_core.refine.sequential import refine

    settings = Settings(method="svd-llm", ratio=0.3)
    ranks = Workbench(ref, "wiki", 4, 64).allocate(settings).ranks
    refine(off.model, names, windows, settings.spec, ranks)
    assert _reads_per_tensor(counts) == {1}
    assert off.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # offloaded again after


def test_streamed_logits_equal_the_models_own(pair):
    from dipsvd_core.engine.stream import streamed_logits
    from dipsvd_core.model.blocks import find_blocks

    _, ref = pair
    windows = Workbench(ref, "wiki", 3, 64).windows()
    blocks = find_blocks(ref.model)[1]
    before = list(blocks)
    with torch.no_grad():
        for i, ids, logits in streamed_logits(ref.model, blocks, windows):
            torch.testing.assert_close(logits, ref.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert list(blocks) == before  # the blocks are put back


def test_a_placement_gives_the_device_map(tiny_model_dir):
    """plan.place_blocks's counts become an accelerate device map: outside the blocks and the first blocks on the
    device, then host memory, then disk; loaded with it, the model is the one offloaded by hand above."""
    from dipsvd_core.model.offload import block_device_map
    from dipsvd_core.plan import Placement, load_config, meta_model

    config, _ = load_config(tiny_model_dir)
    meta = meta_model(config)
    assert block_device_map(meta, torch.device("cpu"), 0, 1) == DEVICE_MAP
    assert block_device_map(meta, torch.device("cpu"), 1, 0) == DEVICE_MAP  # on the CPU, "in memory" is "cpu"
    assert block_device_map(meta, torch.device("cuda"), 1, 0) == dict(DEVICE_MAP, **{
        k: 0 for k in DEVICE_MAP if k != "model.layers.1"}, **{"model.layers.1": "disk"})
    lm = load_model(tiny_model_dir, "cpu", "float32", offload=True, blocks=Placement(1, 0, 1, gpu=False))
    assert lm.model.hf_device_map == DEVICE_MAP and lm.offloaded


def test_the_plan_hands_the_loader_its_device_map(tiny_model_dir, monkeypatch):
    """The plan reads the config once: its placement carries the device map, and loading with that placement reads
    no config again (issue 40, item 3)."""
    from dipsvd_core import plan as P

    monkeypatch.setenv("DIPSVD_STUDIO_RUNTIME", "1GiB")  # the runtime pinned, so the budget below is exact
    run = P.run_of(offload=True)
    roomy = P.make_plan(tiny_model_dir, "cpu", run, bench=False, budgets={"host": 10 ** 12})
    streamed = P.memory(roomy.shape, roomy.run.replace(disk_blocks=2), False, roomy.runtime_bytes)
    budget = max(p.host_bytes for p in streamed.values() if p.needed) + roomy.shape.block_params * 2  # half a block
    plan = P.make_plan(tiny_model_dir, "cpu", run, bench=False, budgets={"host": budget})
    assert (plan.placement.device, plan.placement.disk) == (0, 2) and dict(plan.placement.device_map) == dict(
        DEVICE_MAP, **{"model.layers.0": "disk"})
    assert "device_map" not in plan.to_dict()["placement"]

    def no_second_read(*a, **k):
        raise AssertionError("the loader read the config again")
    monkeypatch.setattr(P, "load_config", no_second_read)
    lm = load_model(tiny_model_dir, "cpu", "float32", offload=True, blocks=plan.placement)
    assert lm.model.hf_device_map == dict(plan.placement.device_map) and lm.offloaded


def test_a_side_by_side_copy_of_an_offloaded_model_shares_its_weights(tiny_model_dir):
    """The app's build: a compressed copy beside the original. Offloaded, the copy's hooks read the original's host
    and disk weights (the same maps, nothing copied), its low-rank pairs compute on the execution device, and both
    models give the in-memory figures; generation runs on both."""
    from dipsvd_core.engine.evaluate import generate
    from dipsvd_core.model.offload import offload_hooks

    settings = Settings(method="svd-llm", ratio=0.3)
    off = load_model(tiny_model_dir, "cpu", "float32", device_map=DEVICE_MAP)
    ref = load_model(tiny_model_dir, "cpu", "float32")
    a, b = Workbench(off, "wiki", 4, 64), Workbench(ref, "wiki", 4, 64)
    ev = a.eval_windows("wiki", 512)
    before = perplexity(off.model, ev)
    ra, rb = a.build(settings), b.build(settings)
    assert ra.model is not off.model
    assert perplexity(ra.model, ev) == pytest.approx(perplexity(rb.model, ev), rel=1e-6)
    assert perplexity(off.model, ev) == before  # the original is untouched
    maps = {id(h.weights_map) for m in off.model.modules() for h in offload_hooks(m)}
    copied = {id(h.weights_map) for m in ra.model.modules() for h in offload_hooks(m)}
    assert copied and copied <= maps
    texts = [generate(m, off.tokenizer, ["The sea"], max_new_tokens=4)[0]["text"] for m in (off.model, ra.model)]
    assert texts[0] == generate(ref.model, ref.tokenizer, ["The sea"], max_new_tokens=4)[0]["text"]
    assert texts[1] == generate(rb.model, ref.tokenizer, ["The sea"], max_new_tokens=4)[0]["text"]


def test_the_next_block_is_sent_ahead_and_the_figures_do_not_change(counted, pair, monkeypatch):
    """With the next block's weights sent ahead (offload.Ahead: on CUDA a pinned, non-blocking copy on a side stream
    from a background thread; here the CPU's disk reads, switched on for the test), a pass still reads each
    offloaded tensor once, the block takes the copies sent for it, and the figures stay those of the model in
    memory. A pass walking back (Fisher's backward) sends nothing ahead."""
    from dipsvd_core.allocation.fisher import fisher_info
    from dipsvd_core.engine.stats import stream_stats
    from dipsvd_core.model import offload

    off, counts = counted
    _, ref = pair
    monkeypatch.setattr(offload, "PREFETCH_ON", {"cuda", "cpu"})
    installed = []
    real = offload.Ahead.install
    monkeypatch.setattr(offload.Ahead, "install", lambda self, m, h: installed.append(real(self, m, h)) or installed[-1])
    offload._LAST[0] = lambda: None  # a fresh start: the first block of the next pass sends the second ahead
    windows = Workbench(ref, "wiki", 4, 64).windows()
    names = [t.name for t in ref.targets]
    sa, sb = stream_stats(off.model, names, windows), stream_stats(ref.model, names, windows)
    assert installed and all(installed)  # every module of block 1 took its copies
    assert _reads_per_tensor(counts) == {1}
    for g in sb.alphas:
        torch.testing.assert_close(sa.alphas[g], sb.alphas[g], rtol=1e-9, atol=0)
    counts.clear()
    offload._LAST[0] = lambda: None
    fa, fb = fisher_info(off.model, off.targets, windows), fisher_info(ref.model, ref.targets, windows)
    assert _reads_per_tensor(counts) == {2}  # forward and backward, and nothing wasted ahead of the backward
    np.testing.assert_allclose(fa.per_block, fb.per_block, rtol=1e-6)
    assert not offload._AHEAD and off.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"


def test_a_block_sent_ahead_on_its_first_pass_offloads_again_after(tiny_model_dir, monkeypatch):
    """The first pass of a freshly loaded model: a block whose weights were sent ahead never ran its hooks'
    pre_forward, yet its hooks offload it again after (their post_forward reads pre_forward's bookkeeping)."""
    from accelerate.hooks import AlignDevicesHook

    from dipsvd_core.engine.stats import stream_stats
    from dipsvd_core.model import offload

    monkeypatch.setattr(offload, "PREFETCH_ON", {"cuda", "cpu"})
    lm = load_model(tiny_model_dir, "cpu", "float32", device_map=DEVICE_MAP)
    for m in lm.model.modules():  # as if nothing had ever run through them
        for h in offload.offload_hooks(m):
            if hasattr(h, "tied_pointers_to_remove"):
                del h.tied_pointers_to_remove
    assert any(isinstance(h, AlignDevicesHook) for m in lm.model.modules() for h in offload.offload_hooks(m))
    offload._LAST[0] = lambda: None
    windows = Workbench(lm, "wiki", 2, 32).windows()
    stream_stats(lm.model, [t.name for t in lm.targets], windows)
    assert lm.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
