"""Issue 38: compiled generation (a static cache and torch.compile) gives the eager greedy tokens, for the original,
the compressed model and a saved folder loaded through plain transformers (trust_remote_code); speed figures carry
their settings and the bytes a decode step reads. torch.compile costs tens of seconds per model on a CPU."""
from __future__ import annotations

import json

import pytest
import torch

from dipsvd_core.engine.evaluate import generate
from dipsvd_core.engine.speed import bytes_bound, compile_default, decode_bytes, speed
from dipsvd_core.io.compressed import save_compressed
from dipsvd_core.model.models import count_params
from dipsvd_core.run.pipeline import Settings, Workbench

PROMPTS = ["The sea", "Once upon a time there was"]


@pytest.fixture(scope="module")
def compressed(tiny_lm):
    bench = Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)
    return bench.build(Settings(method="svd-llm", ratio=0.4)).model


def test_decode_bytes_count_each_weight_once(tiny_lm, compressed):
    buffers = sum(b.numel() * b.element_size() for b in tiny_lm.model.buffers() if b.is_floating_point())
    assert decode_bytes(tiny_lm.model) == 4 * count_params(tiny_lm.model) + buffers  # float32, tied embedding once
    assert decode_bytes(compressed) == 4 * count_params(compressed) + buffers  # the fused stacks are not extra
    assert not compile_default(torch.device("cpu")) and compile_default(torch.device("cuda"))


def test_eager_speed_reports_its_settings_and_bound(tiny_lm, compressed):
    a, b = (speed(m, seqlen=16, new_tokens=4, repeats=3) for m in (tiny_lm.model, compressed))
    assert a["settings"] == {"mode": "eager", "cache": "dynamic", "batch": 1, "prompt": 16, "new_tokens": 4,
                             "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32"}
    assert a["compile_s"] is None and a["runs"] == 3 and a["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0
    assert bytes_bound(a, b) == decode_bytes(tiny_lm.model) / decode_bytes(compressed)
    assert a["decode_bytes"] - b["decode_bytes"] == 4 * (count_params(tiny_lm.model) - count_params(compressed)) > 0


CHILD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, CompileConfig, StaticCache
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.tensor(json.load(open(sys.argv[2])))
config = CompileConfig(mode="default")
config._compile_all_devices = True
fused = sum(getattr(m, "siblings", None) is not None for m in model.modules())
with torch.no_grad():
    eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8)
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache, compile_config=config)
print()
print(json.dumps({"eager": eager.tolist(), "compiled": compiled.tolist(), "fused": fused,
                  "was_compiled": getattr(model, "_compiled_call", None) is not None}))
"""


@pytest.mark.slow
def test_compiled_greedy_equals_eager(tiny_lm, compressed, tmp_path):
    from tests.io.test_portable import run_isolated

    for model in (tiny_lm.model, compressed):
        eager = generate(model, tiny_lm.tokenizer, PROMPTS, max_new_tokens=8)
        compiled = generate(model, tiny_lm.tokenizer, PROMPTS, max_new_tokens=8, compiled=True)
        assert [r["text"] for r in compiled] == [r["text"] for r in eager] and eager[0]["text"]
        assert compiled[0]["mode"] == "compiled" and compiled[0]["compile_s"] > 0 and eager[0]["compile_s"] is None
        assert getattr(model, "_compiled_call", None) is not None  # transformers compiled its decode step
    fast = speed(compressed, seqlen=16, new_tokens=4, compiled=True)
    assert fast["settings"]["mode"] == "compiled" and fast["settings"]["cache"] == "static" and fast["compile_s"] > 0
    out = save_compressed(compressed, tmp_path / "c", tiny_lm.tokenizer, {"method": "svd-llm"})
    ids = tiny_lm.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    proc = run_isolated(CHILD, out, tmp_path / "ids.json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = compressed.generate(ids, max_new_tokens=8, do_sample=False)
    assert got["compiled"] == got["eager"] == ours.tolist() and got["fused"] == 10 and got["was_compiled"]


def test_compile_is_a_flag_of_compress_and_evaluate_defaulting_by_device():
    from dipsvd_core.cli import build_parser

    p = build_parser()
    for cmd in ("compress", "evaluate"):
        assert [p.parse_args([cmd, "--model", "m", *flag]).compile for flag in ([], ["--compile"], ["--no-compile"])] \
            == [None, True, False]
