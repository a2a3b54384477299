"""The GPU check of issue 23, item 7: the full best path on CUDA, each phase measured against the plan.

    .venv/bin/python bench/gpu_check.py [--write] [--out bench/gpu_check.json]   (make gpu-check)
    .venv/bin/python bench/gpu_check.py --tiny --out FILE                        (the CPU test of the script)

For each case a random-init Llama of real widths is saved with the bundled tokenizer (a transformers config, no
download), then, as a user would run it:
1. `compress --method dipsvd --allocation nested --refine sequential --ratio 0.2 --out DIR --generate` (plan,
   load, statistics and factors, Fisher, the type probe, refine, surgery, evaluation, generation, save);
2. `evaluate --model DIR --generate` (the saved model loaded back, evaluated, generating).
Each compress phase's measured peaks (the report's memory.phases: host RSS and CUDA max allocated) and seconds are
set beside the plan's prediction for the same run (the report's plan).

Cases on CUDA: Llama-3.2-1B's widths with 16 blocks, bfloat16; Llama-3-8B's widths with 3 blocks, bfloat16,
`--device-memory 22GiB`; Llama-3-8B's widths with 8 blocks offloaded (`--offload --device-memory 23GiB`: the plan
keeps one block on the GPU, the others stream from host memory, each sent once per pass). With --tiny (no GPU needed): the test suite's tiny Llama on the CPU, which is how
tests/test_gpu_check.py runs this script. --write replaces the "## GPU check (issue 23)" section of
bench/RESULTS.md (CUDA runs only).
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

from common import BENCH, RESULTS, ROOT, replace_section, utc_date, write_json

SECTION = "## GPU check (issue 23)"
WIDTHS = {  # config.json values of the models our users bring
    "Llama-3.2-1B x16": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3-8B x3": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=3, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256),
    "Llama-3-8B x8": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}
CASES = {  # name -> (widths, device, dtype, calibration windows x tokens, extra compress options)
    "Llama-3.2-1B x16": ("Llama-3.2-1B x16", "cuda", "bfloat16", (32, 512), []),
    "Llama-3-8B x3": ("Llama-3-8B x3", "cuda", "bfloat16", (32, 512), ["--device-memory", "22GiB"]),
    # offloaded: the budget leaves room for one block beside the working set, so 7 of 8 stream from host memory
    "Llama-3-8B x8 offload": ("Llama-3-8B x8", "cuda", "bfloat16", (32, 512), ["--offload", "--device-memory", "23GiB"]),
    "tiny": ("tiny", "cpu", "float32", (8, 64), []),
}


def random_model(folder: Path, widths: dict, dtype: str) -> Path:
    """A random-init Llama of these widths saved with the bundled tokenizer (whose ids fit any vocabulary here)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import bundled_tokenizer_dir

    src, name = bundled_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    cfg = LlamaConfig(**widths, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cli(*args: str, cache: Path) -> tuple[dict, float]:
    """One `python -m dipsvd_core` command with a --report; (the report, wall seconds)."""
    report = cache.parent / f"report-{len(list(cache.parent.glob('report-*')))}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", *args, "--report", str(report), "--quiet"], cwd=ROOT,
                          env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache), PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text()), time.perf_counter() - t0


def run_case(name: str) -> dict:
    widths, device, dtype, (windows, seqlen), extra = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(tmp / "model", WIDTHS[widths], dtype)
        common = ["--device", device, "--dtype", dtype]
        compressed, compress_s = cli(
            "compress", "--model", str(model), *common, "--method", "dipsvd", "--allocation", "nested", "--refine",
            "sequential", "--ratio", "0.2", "--calib-windows", str(windows), "--seqlen", str(seqlen), "--eval",
            "wiki", "--eval-tokens", str(2 * windows * seqlen), "--generate", "--out", str(tmp / "out"), *extra,
            cache=tmp / "cache")
        loaded, evaluate_s = cli("evaluate", "--model", str(tmp / "out"), *common, "--eval", "wiki", "--eval-tokens",
                                 str(2 * windows * seqlen), "--seqlen", str(seqlen), "--generate", cache=tmp / "cache")
    planned = compressed["plan"]["phases"]
    phases = {}
    for phase, m in compressed["memory"]["phases"].items():
        p = planned.get(phase, {})
        phases[phase] = {"host_peak_bytes": m["host_peak_bytes"], "device_peak_bytes": m["device_peak_bytes"],
                         "seconds": m["seconds"], "plan_host_bytes": p.get("host_bytes"),
                         "plan_device_bytes": p.get("device_bytes"), "plan_seconds": p.get("seconds")}
    return {"case": name, "device": device, "dtype": dtype, "calibration": f"{windows}x{seqlen}", "options": extra,
            "compress_s": compress_s, "evaluate_s": evaluate_s, "phases": phases,
            "ppl": {"compressed": compressed["ppl"]["compressed"], "loaded": loaded["ppl"]},
            "generated": {"compress": len(compressed["generations"]["compressed"]),
                          "loaded": len(loaded["generations"])},
            "peak_memory_mb": compressed["peak_memory_mb"], "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def markdown(rows: list[dict]) -> str:
    mb = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = []
    for r in rows:
        lines += [f"### {r['case']} ({r['dtype']}, {r['calibration']}, {' '.join(r['options']) or 'no budget'})", "",
                  f"compress {r['compress_s']:.0f} s, evaluate of the saved model {r['evaluate_s']:.0f} s; perplexity "
                  f"on wiki {r['ppl']['compressed']['wiki']:.2f} after compress, {r['ppl']['loaded']['wiki']:.2f} "
                  "loaded back.", "",
                  "| phase | host MB | plan host MB | device MB | plan device MB | s | plan s |",
                  "|---|---|---|---|---|---|---|"]
        for phase, p in r["phases"].items():
            ps = "-" if p["plan_seconds"] is None else f"{p['plan_seconds']:.0f}"
            lines.append(f"| {phase} | {mb(p['host_peak_bytes'])} | {mb(p['plan_host_bytes'])} | "
                         f"{mb(p['device_peak_bytes'])} | {mb(p['plan_device_bytes'])} | {p['seconds']:.1f} | {ps} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (what the test suite runs)")
    p.add_argument("--out", default=str(BENCH / "gpu_check.json"))
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    import torch

    if args.tiny:
        names = ["tiny"]
    elif torch.cuda.is_available():
        names = ["Llama-3.2-1B x16", "Llama-3-8B x3"]
    else:
        raise SystemExit("gpu-check needs a CUDA device (no GPU here); `--tiny` runs the same script on the CPU")
    rows = []
    for name in names:
        rows.append(run_case(name))
        write_json(args.out, rows)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "phases"}), flush=True)
    if args.write and not args.tiny:
        body = (f"{SECTION}\n\nMachine: {rows[0]['gpu']}. Date: {utc_date()}. Command: `make gpu-check` "
                f"(bench/gpu_check.py; rows in bench/{Path(args.out).name}). Random-init Llamas of real widths; "
                "dipsvd + nested + refine sequential at 0.2, saved, loaded back, evaluated and generating. Measured "
                "peaks per phase (host RSS, CUDA max allocated) beside the plan's prediction.\n\n" + markdown(rows))
        replace_section(RESULTS, SECTION, body)


if __name__ == "__main__":
    main()
