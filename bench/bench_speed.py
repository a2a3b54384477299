"""Issue 24, item 3, and issue 38: is the compressed model faster? Prefill and decode tokens/s, original against
compressed.

    .venv/bin/python bench/bench_speed.py [--ratios 0.2,0.4] [--write]            # issue 24's grid
    .venv/bin/python bench/bench_speed.py --alternate [--runs 3] [--write]       # issue 38's figures

--alternate (bench_alternate.py): the bundled model at batch 1, prompt 128, 32 new tokens, original and dipsvd at
each ratio run alternately in one process (so that they share the machine's load), eager and compiled, medians of
--runs, each beside its bytes bound, with a profile of an eager decode step; then one decoder block of Llama-3-8B's
widths, dense against low-rank pairs at the uniform rank of each ratio. Its section is "## Faster than the original
(issue 38)".

The bundled SmolLM2-135M (float32 on this CPU, or bfloat16 on CUDA), dipsvd + uniform at each ratio built from the
cached factors (32 x 512 of wiki, the benches' calibration; uniform ranks do not depend on it); `evaluate.speed` at
batch 1 and 8 with prompts of 128 and 1024 tokens (prefill: the whole prompt in one forward; decode: 32 single-token
steps on its KV cache, every sequence of the batch counted), the best of 2 each, models in turn. Then a
microbenchmark of the reason: one Linear of each targeted shape, dense against the low-rank pair at the uniform rank
of each ratio, for 1, 8, 1024 and 8192 rows of input, and of Llama-3-8B's shapes for 1 and 8 rows (decode). --write
replaces the "## Speed of the compressed model (issue 24)" section of bench/RESULTS.md; the rows go to
bench/speed.json.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import BENCH, PLAIN, RESULTS, load_bundled, machine, replace_section, utc_date, workbench, write_json

from dipsvd_core.allocation.budget import rank_for
from dipsvd_core.engine.evaluate import speed
from dipsvd_core.run.pipeline import Settings

SECTION = "## Speed of the compressed model (issue 24)"
LLAMA8B = {(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)}  # q/o, k/v, gate/up, down
SETTINGS = [(1, 128), (8, 128), (1, 1024), (8, 1024)]  # (batch, prompt tokens)


def model_speeds(models: dict) -> list[dict]:
    rows = []
    for batch, seqlen in SETTINGS:
        for name, model in models.items():
            r = speed(model, seqlen=seqlen, new_tokens=32, batch=batch)
            rows.append({"model": name, "batch": batch, "prompt": seqlen, **r})
            print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def linear_speeds(shapes: set, ratios: list[float], dtype: torch.dtype, device, tokens_list=(1, 8, 1024, 8192),
                  model: str = "SmolLM2-135M") -> list[dict]:
    """Seconds of y = W x against y = U (V x) for each (out, in) shape at the uniform rank of each ratio."""
    rows = []
    for out_f, in_f in sorted(shapes):
        w = torch.randn(out_f, in_f, dtype=dtype, device=device)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, dtype=dtype, device=device)
            dense = _best(lambda: x @ w.T)
            for ratio in ratios:
                k = rank_for(1 - ratio, out_f, in_f)
                u, v = torch.randn(out_f, k, dtype=dtype, device=device), torch.randn(k, in_f, dtype=dtype, device=device)
                pair = _best(lambda: (x @ v.T) @ u.T)
                rows.append({"model": model, "shape": [out_f, in_f], "tokens": tokens, "ratio": ratio, "rank": k,
                             "dense_s": dense, "pair_s": pair, "pair_over_dense": pair / dense})
    return rows


def _best(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def markdown(res: dict) -> str:
    by = {(r["model"], r["batch"], r["prompt"]): r for r in res["models"]}
    names = list(dict.fromkeys(r["model"] for r in res["models"]))
    lines = [SECTION, "", f"Machine: {res['machine']}. Date: {res['date']}. Command: `.venv/bin/python "
             "bench/bench_speed.py --write` (rows in bench/speed.json). The bundled SmolLM2-135M, float32; dipsvd + "
             "uniform (its ranks depend only on the ratio). Tokens/s, every sequence of the batch counted; in brackets the "
             "compressed / original ratio.", "",
             "| batch | prompt | " + " | ".join(f"{n} prefill | {n} decode" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for batch, seqlen in SETTINGS:
        o = by[("original", batch, seqlen)]
        cells = []
        for n in names:
            r = by[(n, batch, seqlen)]
            rel = lambda k: "" if n == "original" else f" ({r[k] / o[k]:.2f}x)"  # noqa: E731
            cells += [f"{r['prefill_tok_s']:,.0f}{rel('prefill_tok_s')}", f"{r['decode_tok_s']:,.1f}{rel('decode_tok_s')}"]
        lines.append(f"| {batch} | {seqlen} | " + " | ".join(cells) + " |")
    lines += ["", "One Linear, dense against the low-rank pair at the uniform rank (time of the pair / time of the "
              "dense product; below 1 the pair is faster):", "",
              "| widths of | shape (out x in) | rank | ratio | 1 row | 8 rows | 1024 rows | 8192 rows |",
              "|---|---|---|---|---|---|---|---|"]
    cells = {}
    for r in res["linears"]:
        key = (r.get("model", "SmolLM2-135M"), tuple(r["shape"]), r["rank"], r["ratio"])
        cells.setdefault(key, {})[r["tokens"]] = r["pair_over_dense"]
    for (model, shape, k, ratio), t in cells.items():
        lines.append(f"| {model} | {shape[0]} x {shape[1]} | {k} | {ratio} | "
                     + " | ".join(f"{t[n]:.2f}" if n in t else "-" for n in (1, 8, 1024, 8192)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--alternate", action="store_true", help="issue 38's figures (bench_alternate.py)")
    ap.add_argument("--runs", type=int, default=3, help="--alternate: timed runs of each model (the median is kept)")
    ap.add_argument("--parts", default="bundled,block", help="--alternate: which parts to run")
    ap.add_argument("--block-dtypes", default="float32,bfloat16", help="--alternate: the 8B-width block's dtypes")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.alternate:
        from bench_alternate import run_alternate

        run_alternate(ratios, args.runs, args.parts.split(","), args.block_dtypes.split(","), args.write)
        return
    torch.manual_seed(0)
    lm = load_bundled()
    wb = workbench(lm)
    models = {"original": lm.model}
    for ratio in ratios:
        models[f"dipsvd {ratio}"] = wb.build(Settings(method="dipsvd", ratio=ratio, **PLAIN)).model
    res = {"machine": machine(), "date": utc_date(), "models": model_speeds(models)}
    p = next(lm.model.parameters())
    res["linears"] = linear_speeds({(t.out_features, t.in_features) for t in wb.targets}, ratios, p.dtype, p.device)
    res["linears"] += linear_speeds(LLAMA8B, ratios, p.dtype, p.device, (1, 8), "Llama-3-8B")  # decode-sized inputs
    write_json(BENCH / "speed.json", res)
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(RESULTS, SECTION, text)


if __name__ == "__main__":
    main()
