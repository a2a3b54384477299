"""Issue 23's depth check: the whole best path, at 8 and at 32 blocks, and the plan's word per phase.

    .venv/bin/python bench/bench_depth.py [--write] [--layers 8,32] [--path best|uniform]

For each depth a random-init Llama of SmolLM2-360M's widths (hidden 960, intermediate 2560, 15 / 5 heads) is saved
with the bundled tokenizer (float32), then run as a user would, each command in a process of its own on an empty
cache:
1. `compress --method dipsvd --allocation nested --refine sequential --ratio 0.2 --calib-windows 8 --seqlen 256
   --out DIR` (float32, CPU);
2. `evaluate --model DIR`.
`--path uniform` runs `--allocation uniform --refine none` instead (issue 39: the plan within 25% of the measured
peak on the uniform path too), into its own section and bench/depth_uniform.json.
Peak RSS is each process's own lifetime peak (the report's peak_memory_mb). Target: from 8 to 32 blocks, each peak
grows by at most 1.25x the added float32 weights (compress) or the added saved weights (evaluate, the load).
The 32-block compress's measured per-phase host peaks are set beside the plan's prediction (the report's plan);
target: within 25% for every phase of 200 MB or more. --write replaces the "## Depth, the whole path (issue 23)"
section of bench/RESULTS.md; the rows go to bench/depth.json.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_stream import SMOL360, random_llama
from common import BENCH, RESULTS, machine, replace_section, utc_date, write_json
from gpu_check import cli

SECTION = "## Depth, the whole path (issue 23)"
COMMON = ["--device", "cpu", "--dtype", "float32"]
RUN = ["--ratio", "0.2", "--calib-windows", "8", "--seqlen", "256", "--eval", "wiki", "--eval-tokens", "2048",
       "--no-eval-original"]
PATHS = {  # --path: the compress options, the section of bench/RESULTS.md and the rows' file
    "best": (["--method", "dipsvd", "--allocation", "nested", "--refine", "sequential", *RUN],
             SECTION, "depth.json"),
    "uniform": (["--method", "dipsvd", "--allocation", "uniform", "--refine", "none", *RUN],
                "## Depth, the uniform path (issue 39)", "depth_uniform.json"),
}


def run_depth(layers: int, compress: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = random_llama(tmp / "model", layers, **SMOL360)
        rep, compress_s = cli("compress", "--model", str(tmp / "model"), *COMMON, *compress, "--out", str(tmp / "out"),
                              cache=tmp / "cache")
        saved = sum(f.stat().st_size for f in (tmp / "out").glob("*.safetensors"))
        loaded, evaluate_s = cli("evaluate", "--model", str(tmp / "out"), *COMMON, "--eval", "wiki", "--eval-tokens",
                                 "2048", "--seqlen", "256", cache=tmp / "cache")
    planned = rep["plan"]["phases"]
    phases = {name: {"host_peak_bytes": m["host_peak_bytes"], "seconds": m["seconds"],
                     "plan_host_bytes": planned.get(name, {}).get("host_bytes")}
              for name, m in rep["memory"]["phases"].items()}
    return {"layers": layers, "weight_bytes": weights, "saved_bytes": saved, "compress_s": compress_s,
            "evaluate_s": evaluate_s, "compress_peak_mb": rep["peak_memory_mb"],
            "evaluate_peak_mb": loaded["peak_memory_mb"], "plan_peak_host_bytes": rep["plan"]["peak_host_bytes"],
            "ppl": {"compressed": rep["ppl"]["compressed"]["wiki"], "loaded": loaded["ppl"]["wiki"]},
            "timings_s": rep["timings_s"], "phases": phases}


def markdown(rows: dict, date: str, mach: str, path: str = "best") -> str:
    compress, section, saved = PATHS[path]
    mb = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    layers = ",".join(rows)
    command = ("" if path == "best" else f"--path {path} ") + ("" if layers == "8,32" else f"--layers {layers} ") + "--write"
    lines = [section, "", f"Machine: {mach}. Date: {date}. Command: `.venv/bin/python bench/bench_depth.py {command}` "
             f"(rows in bench/{saved}). Random-init Llamas of SmolLM2-360M's widths, float32 on the CPU; "
             f"`compress {' '.join(compress)} --out DIR`, then `evaluate --model DIR`, each on an empty cache.", "",
             "| blocks | float32 weights MB | saved MB | compress peak MB | compress s | evaluate peak MB | "
             "wiki ppl (compress / loaded) |", "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['layers']} | {mb(r['weight_bytes'])} | {mb(r['saved_bytes'])} | {r['compress_peak_mb']:,.0f} | "
                     f"{r['compress_s']:.0f} | {r['evaluate_peak_mb']:,.0f} | {r['ppl']['compressed']:.4g} / "
                     f"{r['ppl']['loaded']:.4g} |")
    if {"8", "32"} <= set(rows):
        a, b = rows["8"], rows["32"]
        dw, ds = (b["weight_bytes"] - a["weight_bytes"]) / 2**20, (b["saved_bytes"] - a["saved_bytes"]) / 2**20
        dc, de = b["compress_peak_mb"] - a["compress_peak_mb"], b["evaluate_peak_mb"] - a["evaluate_peak_mb"]
        lines += ["", f"Compress: peak(32) - peak(8) = {dc:,.0f} MB against {dw:,.0f} MB of added float32 weights "
                  f"({dc / dw:.2f}x; target at most 1.25x). Load (evaluate): {de:,.0f} MB against {ds:,.0f} MB of "
                  f"added saved weights ({de / ds:.2f}x)."]
    deepest = rows[max(rows, key=int)]
    whole = deepest["plan_peak_host_bytes"] / 2**20
    lines += ["", f"The whole run, {deepest['layers']} blocks: the plan's host peak {whole:,.0f} MB against the measured "
              f"{deepest['compress_peak_mb']:,.0f} MB ({whole / deepest['compress_peak_mb']:.2f}x; target within 25%)."]
    lines += ["", f"Per phase, {deepest['layers']} blocks: measured host peak (VmHWM since the phase began) against the "
              "plan. Target: within 25% for every phase of 200 MB or more.", "",
              "| phase | measured MB | plan MB | plan / measured | s |", "|---|---|---|---|---|"]
    for name, p in deepest["phases"].items():
        ratio = "-" if not p["plan_host_bytes"] else f"{p['plan_host_bytes'] / p['host_peak_bytes']:.2f}"
        lines.append(f"| {name} | {mb(p['host_peak_bytes'])} | {mb(p['plan_host_bytes'])} | {ratio} | "
                     f"{p['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--path", choices=sorted(PATHS), default="best")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    compress, section, saved = PATHS[args.path]
    rows = {}
    for layers in map(int, args.layers.split(",")):
        rows[str(layers)] = run_depth(layers, compress)
        write_json(BENCH / saved, {"machine": machine(), "date": utc_date(), "rows": rows})
        print({k: v for k, v in rows[str(layers)].items() if k != "phases"}, flush=True)
    text = markdown(rows, utc_date(), machine(), args.path)
    print(text)
    if args.write:
        replace_section(RESULTS, section, text)


if __name__ == "__main__":
    main()
