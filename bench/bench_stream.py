"""Benchmark of issue 10: the block-streaming engine against the all-at-once engine it replaced.

    .venv/bin/python bench/bench_stream.py [--write] [--base COMMIT] [--only depth,width,bundled]

Each case runs `python -m dipsvd_core compress` twice, once with the engine of COMMIT (default: the
last commit before streaming, checked out into a temporary git worktree) and once with this tree,
each on an empty cache, one after the other. Peak RSS is the compress process's own ru_maxrss.
- depth: random-init Llamas with SmolLM2-360M's widths (hidden 960, intermediate 2560, GQA 15/5) at
  8 and 32 blocks; svd-llm at ratio 0.2, 8 x 256 calibration tokens. Target: peak(32) - peak(8) at
  most 1.25x the difference of their float32 weights.
- width: a random-init Llama with Llama-3.2-1B's widths (hidden 2048, intermediate 8192, GQA 32/8) and
  4 blocks, same settings; time per block and peak memory.
- bundled: the cold compress of SmolLM2-135M with dipsvd (default settings, 32 x 512 calibration
  tokens); statistics plus factors, evaluation left out of the comparison.
Each "after" run is set beside this tree's `plan` for the same arguments (predicted peak host memory),
and the plan's memory for the users' models on one 80 GB GPU is listed (config only, no weights).
--write replaces the "## Block streaming (issue 10)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, RESULTS, ROOT, machine, replace_section, utc_date, write_json

SECTION = "## Block streaming (issue 10)"
BASE = "4e5cc3d"  # the engine before streaming
SMOL360 = dict(hidden=960, inter=2560, heads=15, kv_heads=5)
LLAMA1B = dict(hidden=2048, inter=8192, heads=32, kv_heads=8)
SMALL = ["--method", "svd-llm", "--ratio", "0.2", "--calib-windows", "8", "--seqlen", "256", "--eval", "wiki",
         "--eval-tokens", "512", "--no-eval-original", "--dtype", "float32", "--device", "cpu"]


def random_llama(folder: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int) -> int:
    """Save a random-init Llama of these shapes with the bundled tokenizer; returns its float32 bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from devkit.models import bundled_tokenizer_dir
    from transformers import AutoTokenizer

    src, name = bundled_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


def compress(tree: Path, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", *args, "--report", str(report), "--quiet"],
                       cwd=tree, env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache), PYTHONPATH=str(tree)),
                       check=True, stdout=subprocess.DEVNULL)
        out = json.loads(report.read_text())
        out["wall_s"] = time.perf_counter() - t0
        out["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        return {k: out[k] for k in ("timings_s", "peak_memory_mb", "wall_s", "cache_bytes", "ppl")}


def plan(*args: str) -> dict:
    """This tree's plan for the same compress arguments (memory only: --no-bench)."""
    allowed = {"--model", "--method", "--ratio", "--calib-windows", "--seqlen", "--eval", "--eval-tokens", "--dtype",
               "--device", "--compute-dtype", "--factor-dtype", "--no-eval-original"}
    out, i = [], 0
    while i < len(args):
        n = 2 if i + 1 < len(args) and not args[i + 1].startswith("--") else 1
        if args[i] in allowed:
            out += args[i: i + n]
        i += n
    with tempfile.TemporaryDirectory() as cache:  # the same empty cache as the compress run it predicts
        res = subprocess.run([sys.executable, "-m", "dipsvd_core", "plan", *out, "--no-bench", "--json"], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), DIPSVD_STUDIO_CACHE=cache), check=True,
                             capture_output=True, text=True)
    return json.loads(res.stdout)


def both(base: Path | None, *args: str) -> dict:
    """Today's engine (base) and this tree, one after the other; the plan's prediction for this tree."""
    out = {"before": compress(base, *args)} if base is not None else {}
    out["after"] = compress(ROOT, *args)
    p = plan(*args)
    out["plan"] = {"peak_host_bytes": p["peak_host_bytes"], "disk_bytes": p["disk_bytes"],
                   "phases": {n: v["host_bytes"] for n, v in p["phases"].items() if v["needed"]}}
    return out


GPU_MODELS = {  # the shapes of the models our users bring (config.json values)
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def gpu_predictions(tmp: Path) -> dict:
    """plan --device cuda --dtype bfloat16 for each model, float64 and float32 compute (memory only)."""
    from transformers import AutoConfig

    out = {}
    for name, cfg in GPU_MODELS.items():
        folder = tmp / name
        kw = dict(cfg)
        AutoConfig.for_model(kw.pop("model_type"), **kw).save_pretrained(folder)
        for compute in ("float64", "float32"):
            res = subprocess.run([sys.executable, "-m", "dipsvd_core", "plan", "--model", str(folder), "--device", "cuda",
                                  "--dtype", "bfloat16", "--compute-dtype", compute, "--no-bench", "--json"],
                                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True,
                                 text=True)
            p = json.loads(res.stdout)
            out[f"{name}|{compute}"] = {"device": p["peak_device_bytes"], "host": p["peak_host_bytes"],
                                        "disk": p["disk_bytes"],
                                        "fisher_device": p["phases"]["fisher"]["device_bytes"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--only", default="depth,width,bundled")
    ap.add_argument("--no-before", action="store_true", help="this tree only (no worktree of --base)")
    args = ap.parse_args()
    cases = args.only.split(",")
    res = {"machine": machine(), "date": utc_date(), "base": args.base}
    previous = BENCH / "stream.json"
    if args.only != "depth,width,bundled" and previous.exists():  # a partial rerun keeps the other cases
        res = dict(json.loads(previous.read_text()), **res)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = None if args.no_before else tmp / "base"
        if base is not None:
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=ROOT, check=True)
        try:
            if "depth" in cases:
                for layers in (8, 32):
                    folder = tmp / f"smol360-{layers}"
                    res[f"depth{layers}_weight_bytes"] = random_llama(folder, layers, **SMOL360)
                    res[f"depth{layers}"] = both(base, "--model", str(folder), *SMALL)
                    print(json.dumps(res[f"depth{layers}"], indent=1), flush=True)
            if "width" in cases:
                folder = tmp / "llama1b-4"
                res["width_weight_bytes"] = random_llama(folder, 4, **LLAMA1B)
                res["width"] = both(base, "--model", str(folder), *SMALL)
                print(json.dumps(res["width"], indent=1), flush=True)
            res["gpu"] = gpu_predictions(tmp)
            if "bundled" in cases:
                res["bundled"] = both(base, "--eval", "wiki", "--eval-tokens", "512", "--no-eval-original")
                print(json.dumps(res["bundled"], indent=1), flush=True)
        finally:
            if base is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    write_json(BENCH / "stream.json", res)
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(RESULTS, SECTION, text)


def markdown(res: dict) -> str:
    rows = []
    for case in ("depth8", "depth32", "width", "bundled"):
        if case not in res:
            continue
        for engine in ("before", "after"):
            if engine not in res[case]:
                continue
            r = res[case][engine]
            t = r["timings_s"]
            planned = ""
            if engine == "after" and "plan" in res[case]:
                pm = res[case]["plan"]["peak_host_bytes"] / 2**20
                planned = f"{pm:,.0f} ({pm / r['peak_memory_mb']:.2f}x)"
            rows.append(f"| {case} | {engine} | {r['peak_memory_mb']:,.0f} | {planned} | {t.get('statistics', 0):.1f} | "
                        f"{t.get('factors', 0):.1f} | {r['cache_bytes'] / 2**20:,.0f} | {r['ppl']['compressed']['wiki']:.4g} |")
    lines = [SECTION, "", f"Machine: {res['machine']}. Date: {res['date']}. Command: "
             f"`.venv/bin/python bench/bench_stream.py --write`; \"before\" is commit {res['base']}.", "",
             "| case | engine | peak RSS MB | plan's peak MB (plan / measured) | statistics s | factors s | cache MB | wiki ppl |",
             "|---|---|---|---|---|---|---|---|", *rows]
    if "depth8" in res and "depth32" in res:
        dw = (res["depth32_weight_bytes"] - res["depth8_weight_bytes"]) / 2**20
        for engine in [e for e in ("before", "after") if e in res["depth32"]]:
            dp = res["depth32"][engine]["peak_memory_mb"] - res["depth8"][engine]["peak_memory_mb"]
            lines.append(f"\nDepth, {engine}: peak(32) - peak(8) = {dp:,.0f} MB against {dw:,.0f} MB of float32 "
                         f"weights ({dp / dw:.2f}x; target at most 1.25x).")
    if "gpu" in res:
        lines += ["", "The plan for the users' models on one GPU (bf16 weights, dipsvd at ratio 0.2, 32 x 512 calibration "
                  "tokens; config only, predicted, not measured):", "",
                  "| model | compute | peak device GB | Fisher phase device GB | peak host GB | disk GB |",
                  "|---|---|---|---|---|---|"]
        for key, v in res["gpu"].items():
            name, compute = key.split("|")
            lines.append(f"| {name} | {compute} | {v['device'] / 2**30:.1f} | {v['fisher_device'] / 2**30:.1f} | "
                         f"{v['host'] / 2**30:.1f} | {v['disk'] / 2**30:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
