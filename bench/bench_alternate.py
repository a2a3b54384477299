"""Issue 38's speed figures (run through `bench_speed.py --alternate`): original and compressed alternately in one
process, eager and compiled, medians of several runs, each beside its bytes bound.

Bundled model: SmolLM2-135M in float32, batch 1, a 128-token prompt and 32 new tokens, dipsvd at each ratio (the
benches' cached factors), fused siblings, u factors column-major (lay_out_pairs); plus, eager, three rows that
split the gain: dipsvd at the first ratio unfused (one call per pair only), the same with its u factors row-major,
and the original with its wide block matrices (gate, up) column-major, a reference transformers does not load. For every mode, each model is warmed up (the compile, timed apart), then the models run in turn,
--runs times. An eager decode step of the original and of the last ratio is profiled (torch.profiler, self CPU
time by operator). 8B-width block: a one-layer Llama of Llama-3-8B's widths (hidden 4096, intermediate 14336, 32
heads, 8 KV heads, a 256-token vocabulary so that the embedding and head weigh nothing), random weights, dense
against low-rank pairs at the uniform rank of each ratio (random factors: only the shapes matter for speed):
decode steps after a 32-token prompt, and a 1024-token prefill; on this CPU, an extrapolation to a GPU, not a GPU
figure.
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from common import BENCH, PLAIN, RESULTS, load_bundled, machine, replace_section, utc_date, workbench, write_json
from torch import nn

from dipsvd_core.allocation.budget import rank_for
from dipsvd_core.engine.speed import Runner, decode_bytes, forget_compiled
from dipsvd_core.lowrank.surgery import compress_model, lay_out_pairs
from dipsvd_core.run.pipeline import Settings

SECTION = "## Faster than the original (issue 38)"
PROMPT, NEW = 128, 32


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def alternate(models: dict, compiled: bool, seqlen: int, new_tokens: int, runs: int, vocab: int = 1000) -> dict:
    """name -> {prefill_tok_s, decode_tok_s (medians), compile_s, decode_bytes, runs}; models warmed up in turn,
    then timed in turn `runs` times."""
    runners = {n: Runner(m, seqlen, new_tokens, 1, compiled, vocab) for n, m in models.items()}
    first = {n: r.warm() for n, r in runners.items()}
    times = {n: [] for n in runners}
    for _ in range(runs):
        for n, r in runners.items():
            times[n].append(r.run())
    out = {}
    for n, ts in times.items():
        out[n] = {"prefill_tok_s": seqlen / statistics.median(t[0] for t in ts),
                  "decode_tok_s": new_tokens / statistics.median(t[1] for t in ts),
                  "compile_s": first[n] if compiled else None, "decode_bytes": decode_bytes(models[n]),
                  "runs": runs, "settings": runners[n].settings()}
        print(n, "compiled" if compiled else "eager", out[n], flush=True)
    if compiled:
        forget_compiled()
    return out


@torch.no_grad()
def profile_decode(model, steps: int = 16, top: int = 8) -> dict:
    """Self CPU time of an eager decode step by operator: ms per step of the `top` largest and their share."""
    from torch.profiler import ProfilerActivity, profile

    runner = Runner(model, PROMPT, steps)
    runner.warm()
    out = runner._prefill()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner._decode(out, steps)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    total = sum(ms for _, ms in rows)
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": total, "ops": [(k, ms, ms / total) for k, ms in rows[:top]]}


def bundled(ratios: list[float], runs: int) -> dict:
    lm = load_bundled("cpu", "float32")
    wb = workbench(lm)
    models = {"original": lm.model}
    for ratio in ratios:
        models[f"dipsvd {ratio}"] = wb.build(Settings(method="dipsvd", ratio=ratio, **PLAIN)).model
    res = {"load_before": load()}
    unfused = wb.build(Settings(method="dipsvd", ratio=ratios[0], **PLAIN)).model
    from dipsvd_core.lowrank.surgery import unfuse_siblings

    unfuse_siblings(unfused)
    row_major = wb.build(Settings(method="dipsvd", ratio=ratios[0], **PLAIN)).model
    lay_out_pairs(row_major, inference=False)
    references = {f"dipsvd {ratios[0]} unfused": unfused, f"dipsvd {ratios[0]} u row-major": row_major,
                  "original, wide matrices column-major": column_major_wide(lm.model)}
    res["eager"] = alternate({**models, **references}, False, PROMPT, NEW, runs)
    del references, unfused, row_major
    res["compiled"] = alternate(models, True, PROMPT, NEW, runs)
    last = f"dipsvd {ratios[-1]}"
    res["profile"] = {n: profile_decode(models[n]) for n in ("original", last)}
    res["load_after"] = load()
    return res


@torch.no_grad()
def column_major_wide(model):
    """A copy of `model` whose block Linears with more outputs than inputs (gate, up) are stored column-major, as
    lay_out_pairs stores the u factors: the share of the compressed model's gain that is the layout's alone (a
    reference: transformers loads the original row-major)."""
    ref = copy.deepcopy(model)
    for lin in ref.model.layers.modules():
        if type(lin) is nn.Linear and lin.out_features > lin.in_features:
            lin.weight = nn.Parameter(lin.weight.detach().T.contiguous().T, requires_grad=False)
    return ref


def block_model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def low_rank(model, ratio: float):
    """`model` with every block Linear a low-rank pair (random factors) at the uniform rank of `ratio`, fused."""
    from dipsvd_core.model.blocks import find_targets

    weights = {}
    for t in find_targets(model):
        k = rank_for(1 - ratio, t.out_features, t.in_features)
        dt = model.model.layers[0].mlp.up_proj.weight.dtype
        weights[t.name] = (torch.randn(t.out_features, k, dtype=dt) / k ** 0.5,
                           torch.randn(k, t.in_features, dtype=dt) / t.in_features ** 0.5)
    return compress_model(model, weights)


def block(ratios: list[float], runs: int, dtypes: list[str]) -> dict:
    res = {"load_before": load()}
    for name in dtypes:
        dense = block_model(getattr(torch, name))
        models = {"dense": dense, **{f"low-rank {r}": low_rank(dense, r) for r in ratios}}
        for mode in (False, True):
            key = f"{name} {'compiled' if mode else 'eager'}"
            res[f"{key} decode"] = alternate(models, mode, 32, 16, runs, vocab=256)
            if name == dtypes[0]:  # the 1024-token prefill in the first dtype only (minutes each on this CPU)
                res[f"{key} prefill"] = alternate(models, mode, 1024, 1, runs, vocab=256)
        del models, dense
    res["load_after"] = load()
    return res


def _x(r: dict, o: dict, key: str) -> str:
    return f"{r[key]:,.1f} ({r[key] / o[key]:.2f}x)"


def bundled_lines(res: dict) -> list[str]:
    lines = ["| mode | model | prefill tok/s | decode tok/s | bytes per decode step | bytes bound | decode / bound "
             "| first call s |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("eager", "compiled"):
        rows = res[mode]
        o = rows["original"]
        for n, r in rows.items():
            bound = o["decode_bytes"] / r["decode_bytes"]
            first = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
            lines.append(f"| {mode} | {n} | {_x(r, o, 'prefill_tok_s')} | {_x(r, o, 'decode_tok_s')} | "
                         f"{r['decode_bytes'] / 1e6:,.1f} MB | {bound:.2f}x | "
                         f"{r['decode_tok_s'] / o['decode_tok_s'] / bound:.0%} | {first} |")
    names = list(res["profile"])
    ops = list(dict.fromkeys(op for n in names for op, _, _ in res["profile"][n]["ops"]))
    by = {n: {op: (ms, share) for op, ms, share in res["profile"][n]["ops"]} for n in names}
    lines += ["", "Profile of an eager decode step (self CPU time by operator, ms per step; share of the step):", "",
              "| operator | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op in ops:
        cells = [f"{by[n][op][0]:.2f} ({by[n][op][1]:.0%})" if op in by[n] else "-" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{res['profile'][n]['total_ms']:.2f}" for n in names) + " |")
    return lines


def block_lines(res: dict) -> list[str]:
    keys = [k for k in res if k.endswith(("decode", "prefill"))]
    names = list(res[keys[0]])
    lines = ["| dtype, mode, part | " + " | ".join(names) + " | bytes bound |", "|---|" + "---|" * (len(names) + 1)]
    for k in keys:
        rows, part = res[k], k.rsplit(" ", 1)[1]
        metric = "decode_tok_s" if part == "decode" else "prefill_tok_s"
        o = rows["dense"]
        cells = [_x(rows[n], o, metric) for n in names]
        bounds = ", ".join(f"{o['decode_bytes'] / rows[n]['decode_bytes']:.2f}x" for n in names[1:])
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {bounds} |")
    return lines


def markdown(res: dict) -> str:
    lines = [SECTION, "", f"Machine: {res['machine']}, {res['threads']} threads; the load average "
             "over 1, 5, 15 minutes before and after each part below says whether other jobs shared the cores (about "
             "1: this benchmark alone). Date: "
             f"{res['date']}. Command: `.venv/bin/python bench/bench_speed.py --alternate --parts PART --runs N "
             "--write` (rows in bench/speed_alternate.json). Medians of the N runs; each model warmed up first (the "
             "compile, when compiled: 'first call'), then the models in turn, so that they see the same load. "
             "Eager: dynamic KV cache; compiled: static KV cache and torch.compile (inductor, default mode on the "
             "CPU). Bytes bound: the original's bytes read per decode step over the model's; decode / bound: how "
             "much of it the measured decode speed-up reaches."]
    if "bundled" in res:
        b = res["bundled"]
        lines += ["", f"The bundled SmolLM2-135M, float32, batch 1, prompt {PROMPT} tokens, {NEW} new tokens; dipsvd "
                  f"with uniform allocation (the default; the benches' factors), siblings fused and u factors column-major "
                  f"(surgery.lay_out_pairs) unless said; the last eager row is the original with its gate and up "
                  f"matrices stored column-major, a reference. {b.get('runs', res['runs'])} runs; load "
                  f"{b['load_before']} before, {b['load_after']} after.", "", *bundled_lines(b)]
    if "block" in res:
        k = res["block"]
        lines += ["", "One decoder block of Llama-3-8B's widths (a one-layer Llama, 256-token vocabulary), random "
                  "weights; low-rank pairs at the uniform rank of each ratio, fused, u column-major in float32. Decode: 16 steps after a "
                  "32-token prompt, tokens/s; prefill: 1024 tokens (in the first dtype only). On this CPU: an extrapolation to a GPU, not a "
                  f"GPU figure. {k.get('runs', res['runs'])} runs; load {k['load_before']} before, {k['load_after']} after.", "", *block_lines(k)]
    return "\n".join(lines)


def run_alternate(ratios: list[float], runs: int, parts: list[str], block_dtypes: list[str], write: bool) -> None:
    res = {"machine": machine(), "date": utc_date(), "threads": torch.get_num_threads(), "runs": runs}
    saved = BENCH / "speed_alternate.json"
    if saved.exists():  # a part not run this time keeps its last figures
        old = json.loads(saved.read_text())
        res.update({k: old[k] for k in ("bundled", "block") if k in old and k not in parts})
    t0 = time.perf_counter()
    if "bundled" in parts:
        res["bundled"] = dict(bundled(ratios, runs), runs=runs)
        write_json(saved, res)
    if "block" in parts:
        res["block"] = dict(block(ratios, runs, block_dtypes), runs=runs)
    res["seconds"] = time.perf_counter() - t0
    write_json(saved, res)
    text = markdown(res)
    print(text)
    if write:
        replace_section(RESULTS, SECTION, text, keep_from="Where the time goes")
