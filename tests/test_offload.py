"""The offload path on the CPU: a tiny model whose device_map puts one block in CPU memory and one on
disk (accelerate's big-model inference) gives the same statistics, factors, Fisher signals and
compressed model as the same model held in memory."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from dipsvd_core.errors import DipSVDError
from dipsvd_core.evaluate import perplexity
from dipsvd_core.loading import load_model
from dipsvd_core.pipeline import Settings, Workbench

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
    with pytest.raises(DipSVDError, match="offloaded model is compressed in place"):
        a.build(settings)
    ra, rb = a.build(settings, inplace=True), b.build(settings, inplace=True)
    assert ra.allocation.ranks == rb.allocation.ranks
    assert perplexity(ra.model, ev) == pytest.approx(perplexity(rb.model, ev), rel=1e-6)


def test_bayes_refuses_an_offloaded_model(pair):
    off, _ = pair
    with pytest.raises(DipSVDError, match="with an offloaded model use the heuristic or coupled allocation"):
        Workbench(off, "wiki", 4, 64).allocate(Settings(method="svd-llm", allocation="bayes", bo_calls=2))


def test_offload_on_the_cpu_is_refused_with_a_reason(tiny_model_dir):
    with pytest.raises(DipSVDError, match="on the CPU there is nothing to offload to"):
        load_model(tiny_model_dir, "cpu", "float32", offload=True)
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", "--model", tiny_model_dir, "--device", "cpu",
                           "--offload", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nothing to offload to" in proc.stderr and "Traceback" not in proc.stderr


def test_refine_matches_the_model_in_memory(pair):
    """Refine swaps forwards on the compressed path (factors in place of a Linear, kept outputs in place of a
    finished attention); over accelerate's offload hooks it gives the same factors, and leaves the hooks as
    they were."""
    from dipsvd_core.refine import refine

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
