"""The GPU check of issue 23, item 7: the full best path on CUDA, each phase measured against the plan.

    .venv/bin/python bench/gpu_check.py [--write] [--out bench/gpu_check.json]   (make gpu-check)
    .venv/bin/python bench/gpu_check.py --tiny --out FILE                        (the CPU test of the script)
    bash .gpu/run.sh          (on the GPU machine, from `make gpu-bundle`: its own torch and transformers, the rest
                               as wheels; --tokenizer and --text point at the bundle's tokenizer folder and text)

For each case a random-init Llama of real widths is saved with the bundled tokenizer (a transformers config, no
download), then, as a user would run it:
1. `compress --method dipsvd --allocation nested --refine sequential --ratio 0.2 --out DIR --generate` (plan,
   load, statistics and factors, Fisher, the type probe, refine, surgery, evaluation, generation, save);
2. `evaluate --model DIR --generate` (the saved model loaded back, evaluated, generating).
Each compress phase's measured peaks (the report's memory.phases: host RSS and CUDA max allocated) and seconds are
set beside the plan's prediction for the same run (the report's plan).

Cases on CUDA, cheapest first (each row is written as it ends, so a run cut short keeps what it did): the tiny
Llama on the CPU and on CUDA (float32, the same ranks and perplexity expected: `conformance` gives the relative
difference); a forced out-of-memory (the 1B widths under torch.cuda.set_per_process_memory_fraction: the answer must
be one line naming the phase); Llama-3.2-1B's widths with 16 blocks, bfloat16; Llama-3-8B's widths with 8 blocks
offloaded (`--offload --device-memory 24GiB --host-memory 5.8GiB`: the plan keeps 4 blocks on the GPU, the
others stream from host memory (1) or disk (3), each sent once per pass; tests/test_gpu_check.py plans it on the CPU); Llama-3-8B's widths with 3 blocks, bfloat16,
no budget; the offloaded case again with block tuning (`--refine block --tune-epochs 2`); last, the 1B widths
distilled for one epoch after the build with recomputed activations (`--distill-epochs 1 --distill-recompute`). With --tiny (no GPU needed): the tiny Llama on the CPU and the out-of-memory case
simulated (torch.OutOfMemoryError raised from refine), which is how tests/test_gpu_check.py runs this script. --write replaces the "## GPU check (issue 23)" section of
bench/RESULTS.md (CUDA runs only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
OFFLOAD = ["--offload", "--device-memory", "24GiB", "--host-memory", "5.8GiB"]  # some blocks in each place
CASES = {  # name -> (widths, device, dtype, calibration windows x tokens, extra compress options)
    "Llama-3.2-1B x16": ("Llama-3.2-1B x16", "cuda", "bfloat16", (32, 512), ["--speed"]),
    "Llama-3-8B x3": ("Llama-3-8B x3", "cuda", "bfloat16", (32, 512), []),  # its refine plans 23 GiB: no budget
    # offloaded: the budgets keep some blocks on the GPU and the others in host memory or on disk
    "Llama-3-8B x8 offload": ("Llama-3-8B x8", "cuda", "bfloat16", (32, 512), OFFLOAD),
    # the same with block tuning, last: the bfloat16 model's float32 masters on CUDA, and the offloaded blocks' tuned
    # norms read by the compressed copy's hooks (surgery._Overlay) through the blocks sent ahead
    "Llama-3-8B x8 offload tuned": ("Llama-3-8B x8", "cuda", "bfloat16", (32, 512),
                                    [*OFFLOAD, "--refine", "block", "--tune-epochs", "2"]),
    # distillation after the build on CUDA: bfloat16 factors stepping float32 masters, the original as the teacher
    # beside the copy, each block's activations recomputed in the backward (--distill-recompute)
    "Llama-3.2-1B x16 distilled": ("Llama-3.2-1B x16", "cuda", "bfloat16", (32, 512),
                                   ["--distill-epochs", "1", "--distill-recompute"]),
    "tiny": ("tiny", "cpu", "float32", (8, 64), []),
    "tiny cuda": ("tiny", "cuda", "float32", (8, 64), []),
}
GPU_CASES = ["rates", "tiny", "tiny cuda", "oom", "Llama-3.2-1B x16", "Llama-3-8B x8 offload", "Llama-3-8B x3",
             "Llama-3-8B x8 offload tuned", "Llama-3.2-1B x16 distilled"]
TINY_CASES = ["rates", "tiny", "oom"]
# The rates the plan's time model needs, at the real widths on CUDA (the host's float64 eigh at 14,336 is left out:
# minutes on the CPU), at small ones on the CPU (--tiny: the code runs, the figures mean nothing)
RATE_WIDTHS = {"cuda": {"device": (4096, 14336), "host": (4096,), "matmul": 8192, "copy_mib": 1024},
               "cpu": {"device": (128,), "host": (128,), "matmul": 256, "copy_mib": 8}}
# The out-of-memory case: what makes the device run out, set before the CLI runs in the same process. On CUDA a
# memory fraction smaller than the 1B model's weights; on the CPU (--tiny) refine raises what CUDA would raise.
OOM = {"cuda": ("Llama-3.2-1B x16", "bfloat16", "import torch; torch.cuda.set_per_process_memory_fraction(0.01)"),
       "cpu": ("tiny", "float32", "import torch; from dipsvd_core.run.pipeline import Workbench\n"
               "def oom(*a, **k): raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
               "Workbench.refine = oom")}
# The offloaded case's placement is pinned by a fixed runtime (the plan measures its own process otherwise): with
# these budgets the plan keeps 4 blocks on the GPU, 1 in host memory and 3 on disk (tests/test_gpu_check.py)
CASE_ENV = {name: {"DIPSVD_STUDIO_RUNTIME": "1GiB"} for name, case in CASES.items() if "--offload" in case[4]}
TEXT = {"calib": "wiki", "eval": "wiki"}  # the texts each run reads (--text: the bundle's files)


def tokenizer(folder: str | None):
    """The bundled tokenizer: from `folder` where given (the GPU bundle's copy), else read from the bundled GGUF."""
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from devkit.models import bundled_tokenizer_dir

    src, name = bundled_tokenizer_dir()
    return AutoTokenizer.from_pretrained(src, gguf_file=name)


def random_model(folder: Path, widths: dict, dtype: str, tok) -> Path:
    """A random-init Llama of these widths saved with the bundled tokenizer (whose ids fit any vocabulary here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**widths, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


STORED: dict = {}  # the rates case's stored eigh times (plan.rates), copied into each later case's cache


def cli(*args: str, cache: Path, env: dict | None = None) -> tuple[dict, float]:
    """One `python -m dipsvd_core` command with a --report; (the report, wall seconds). The rates case's stored
    eigh times go into its cache first, so that its plan reads them at the real widths."""
    report = cache.parent / f"report-{len(list(cache.parent.glob('report-*')))}.json"
    if STORED.get("path"):
        (cache / "rates").mkdir(parents=True, exist_ok=True)
        shutil.copy(STORED["path"], cache / "rates")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", *args, "--report", str(report), "--quiet"], cwd=ROOT,
                          env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache), PYTHONPATH=_path(), **(env or {})),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text()), time.perf_counter() - t0


def run_oom(name: str, tok, device: str) -> dict:
    """A forced device out-of-memory error in a compress run: its exit status and error lines (one expected)."""
    widths, dtype, prelude = OOM[device]
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(Path(tmp) / "model", WIDTHS[widths], dtype, tok)
        code = (f"{prelude}\nfrom dipsvd_core.cli import main\nraise SystemExit(main({_compress_args(model, device, dtype, 4, 64)!r}"
                " + ['--quiet', '--refine', 'sequential', '--ignore-plan']))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(Path(tmp) / "cache"), PYTHONPATH=_path()))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    return {"case": "oom", "device": device, "returncode": proc.returncode, "errors": errors,
            "traceback": "Traceback" in proc.stderr, "one_line": len(errors) == 1 and "Traceback" not in proc.stderr,
            "gpu": _gpu_name()}


def _path() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _compress_args(model: Path, device: str, dtype: str, windows: int, seqlen: int) -> list[str]:
    return ["compress", "--model", str(model), "--device", device, "--dtype", dtype, "--method", "dipsvd",
            "--allocation", "nested", "--ratio", "0.2", "--calib", TEXT["calib"], "--calib-windows", str(windows),
            "--seqlen", str(seqlen), "--eval", TEXT["eval"], "--eval-tokens", str(2 * windows * seqlen)]


def run_case(name: str, tok, device: str | None = None) -> dict:
    widths, device, dtype, (windows, seqlen), extra = CASES[name]  # the case's own device
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(tmp / "model", WIDTHS[widths], dtype, tok)
        common = ["--device", device, "--dtype", dtype]
        compressed, compress_s = cli(
            *_compress_args(model, device, dtype, windows, seqlen), "--refine", "sequential", "--generate", "--out",
            str(tmp / "out"), *extra, cache=tmp / "cache", env=CASE_ENV.get(name))
        loaded, evaluate_s = cli("evaluate", "--model", str(tmp / "out"), *common, "--eval", TEXT["eval"],
                                 "--eval-tokens", str(2 * windows * seqlen), "--seqlen", str(seqlen), "--generate",
                                 cache=tmp / "cache")
    planned = compressed["plan"]["phases"]
    phases = {}
    for phase, m in compressed["memory"]["phases"].items():
        p = planned.get(phase, {})
        phases[phase] = {"host_peak_bytes": m["host_peak_bytes"], "device_peak_bytes": m["device_peak_bytes"],
                         "seconds": m["seconds"], "plan_host_bytes": p.get("host_bytes"),
                         "plan_device_bytes": p.get("device_bytes"), "plan_seconds": p.get("seconds")}
    return {"case": name, "device": device, "dtype": dtype, "calibration": f"{windows}x{seqlen}", "options": extra,
            "compress_s": compress_s, "evaluate_s": evaluate_s, "phases": phases, "ranks": compressed["ranks"],
            "device_peak_bytes": compressed["memory"].get("device_peak_bytes"),
            "plan_peak_device_bytes": compressed.get("plan", {}).get("peak_device_bytes"),
            "placement": compressed.get("plan", {}).get("placement"),
            "ppl": {"compressed": compressed["ppl"]["compressed"], "loaded": loaded["ppl"]},
            "generated": {"compress": len(compressed["generations"]["compressed"]),
                          "loaded": len(loaded["generations"])},
            "peak_memory_mb": compressed["peak_memory_mb"], "gpu": _gpu_name(), "versions": compressed.get("versions")}


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _first(ppl: dict) -> float:
    return next(iter(ppl.values()))


def markdown(rows: list[dict]) -> str:
    mb = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = []
    for r in rows:
        if "phases" not in r:  # the out-of-memory case, the conformance comparison, or a case that failed
            lines += [f"### {r['case']}", "", "```", json.dumps(r, indent=1, default=str)[:3000], "```", ""]
            continue
        lines += [f"### {r['case']} ({r['dtype']}, {r['calibration']}, {' '.join(r['options']) or 'no budget'})", "",
                  f"compress {r['compress_s']:.0f} s, evaluate of the saved model {r['evaluate_s']:.0f} s; perplexity "
                  f"{_first(r['ppl']['compressed']):.2f} after compress, {_first(r['ppl']['loaded']):.2f} loaded "
                  f"back; device peak {mb(r['device_peak_bytes'])} MB (plan {mb(r['plan_peak_device_bytes'])} MB, "
                  "with the CUDA context and workspaces).", "",
                  "| phase | host MB | plan host MB | device MB | plan device MB | s | plan s |",
                  "|---|---|---|---|---|---|---|"]
        for phase, p in r["phases"].items():
            ps = "-" if p["plan_seconds"] is None else f"{p['plan_seconds']:.0f}"
            lines.append(f"| {phase} | {mb(p['host_peak_bytes'])} | {mb(p['plan_host_bytes'])} | "
                         f"{mb(p['device_peak_bytes'])} | {mb(p['plan_device_bytes'])} | {p['seconds']:.1f} | {ps} |")
        lines.append("")
    return "\n".join(lines)


def conformance(rows: list[dict]) -> dict | None:
    """The tiny model on CUDA against the CPU: the same ranks, and the relative perplexity difference."""
    by = {r["case"]: r for r in rows if "phases" in r}
    if not {"tiny", "tiny cuda"} <= set(by):
        return None
    cpu, gpu = by["tiny"], by["tiny cuda"]
    rel = abs(_first(gpu["ppl"]["compressed"]) / _first(cpu["ppl"]["compressed"]) - 1)
    return {"case": "conformance", "same_ranks": cpu["ranks"] == gpu["ranks"], "ppl_rel_diff": rel,
            "within_1e-3": rel < 1e-3}


def run_named(name: str, tok, device: str) -> dict:
    """One case; a failure is recorded as its row (its message) so the cases after it still run."""
    try:
        return RUNNERS.get(name, run_case)(name, tok, device)
    except (SystemExit, Exception) as e:  # noqa: BLE001 (one failed case must not lose the others' figures)
        return {"case": name, "error": str(e)[-3000:]}


def run_rates(name: str, tok, device: str) -> dict:
    """What the plan's time model needs, measured: host-to-device bandwidth (pageable and pinned), eigh and
    Cholesky in float32 and float64 on the device and on the host, a bfloat16 and a TF32 matmul (FLOP/s)."""
    import torch

    from dipsvd_core.lowrank.scalings import best_seconds
    from dipsvd_core.plan.rates import device_name, measure_factorings, store

    dev, w = torch.device(device), RATE_WIDTHS[device]
    out = {"case": name, "device": device, "gpu": _gpu_name(),
           **measure_factorings(dev, w["device"], cholesky=True, host_widths=w["host"])}
    out["stored"] = STORED["path"] = str(store(device_name(dev), out["eigh_s"], "gpu_check"))  # for later plans
    n = w["matmul"]
    for label, dtype, precision in (("bfloat16", torch.bfloat16, "ieee"), ("tf32", torch.float32, "tf32")):
        a = torch.randn(n, n, dtype=dtype, device=dev)
        prev, torch.backends.cuda.matmul.fp32_precision = torch.backends.cuda.matmul.fp32_precision, precision
        out[f"matmul_{label}_flops"] = 2 * n**3 / best_seconds(lambda: a @ a, dev)
        torch.backends.cuda.matmul.fp32_precision = prev
    host = torch.empty(w["copy_mib"] << 18, dtype=torch.float32)  # copy_mib MiB
    out["h2d_pageable_bytes_per_s"] = host.numel() * 4 / best_seconds(lambda: host.to(dev), dev)
    if device == "cuda":  # pinning needs a CUDA context
        pinned = host.pin_memory()
        out["h2d_pinned_bytes_per_s"] = host.numel() * 4 / best_seconds(lambda: pinned.to(dev, non_blocking=True), dev)
    return out


RUNNERS = {"oom": run_oom, "rates": run_rates}  # the cases that are not a compress + evaluate of CASES


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (what the test suite runs)")
    p.add_argument("--out", default=str(BENCH / "gpu_check.json"))
    p.add_argument("--md", help="also write the markdown summary here")
    p.add_argument("--tokenizer", help="a saved tokenizer folder (the GPU bundle's); default: the bundled GGUF's")
    p.add_argument("--text", nargs=2, metavar=("CALIB", "EVAL"), help="text files for calibration and evaluation "
                   "(the GPU bundle's); default: wiki")
    p.add_argument("--cases", help="comma-separated case names (default: all of the device's)")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    import torch

    if args.tiny:
        names, device = TINY_CASES, "cpu"
    elif torch.cuda.is_available():
        names, device = GPU_CASES, "cuda"
    else:
        raise SystemExit("gpu-check needs a CUDA device (no GPU here); `--tiny` runs the same script on the CPU")
    names = args.cases.split(",") if args.cases else names
    if args.text:
        TEXT.update(calib=args.text[0], eval=args.text[1])
    tok, rows = tokenizer(args.tokenizer), []
    for name in names:
        rows.append(run_named(name, tok, device))
        extra = [c for c in [conformance(rows)] if c]
        write_json(args.out, rows + extra)
        if args.md:
            Path(args.md).write_text(markdown(rows + extra))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("phases", "ranks")}), flush=True)
    if args.write and not args.tiny:
        body = (f"{SECTION}\n\nMachine: {rows[0].get('gpu')}. Date: {utc_date()}. Command: `make gpu-check` "
                f"(bench/gpu_check.py; rows in bench/{Path(args.out).name}). Random-init Llamas of real widths; "
                "dipsvd + nested + refine sequential at 0.2, saved, loaded back, evaluated and generating. Measured "
                "peaks per phase (host RSS, CUDA max allocated) beside the plan's prediction.\n\n" + markdown(rows))
        replace_section(RESULTS, SECTION, body)


if __name__ == "__main__":
    main()
