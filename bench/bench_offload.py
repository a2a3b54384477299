"""Where `--offload` puts the blocks of the users' models, from the memory budgets (issue 23, items 1 and 6).

    .venv/bin/python bench/bench_offload.py [--write]

For Llama-3-8B, Qwen2.5-7B and Mistral-7B (their config.json values, no weights), bfloat16 on CUDA, the best path
(`--method dipsvd --allocation nested --refine sequential --ratio 0.2`) at the default calibration (32 x 512) and at
the papers' (256 x 2048), and a few workstation budgets: the plan's placement (plan.place_blocks) and the predicted
peaks of the placed run. Predicted from the config alone on this CPU; nothing here ran on a GPU. --write replaces
the "## Offload by the memory budgets (issue 23)" section of bench/RESULTS.md (rows in bench/offload.json).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import BENCH, RESULTS, machine, replace_section, utc_date, write_json

SECTION = "## Offload by the memory budgets (issue 23)"
MODELS = {  # config.json values
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "Mistral-7B": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}
BUDGETS = [(24, 64), (24, 32), (24, 20), (40, 64), (80, 128)]  # GiB of GPU memory, GiB of host memory
CALIBRATIONS = [(32, 512), (256, 2048)]


def rows(folder: Path) -> list[dict]:
    from transformers import AutoConfig

    from dipsvd_core import plan as P

    out = []
    for name, cfg in MODELS.items():
        kw = dict(cfg)
        AutoConfig.for_model(kw.pop("model_type"), **kw).save_pretrained(folder / name)
        for windows, seqlen in CALIBRATIONS:
            run = P.run_of(dtype="bfloat16", offload=True, method="dipsvd", allocation="nested", refine="sequential",
                           ratio=0.2, calib_windows=windows, seqlen=seqlen)
            for dev, host in BUDGETS:
                plan = P.make_plan(str(folder / name), "cuda", run, bench=False,
                                   budgets={"device": dev * P.GiB, "host": host * P.GiB})
                at = plan.placement
                out.append({"model": name, "calibration": f"{windows}x{seqlen}", "device_gib": dev, "host_gib": host,
                            "on_gpu": at.device, "in_host": at.host, "on_disk": at.disk,
                            "peak_device_gib": plan.peak_device_bytes / P.GiB,
                            "peak_host_gib": plan.peak_host_bytes / P.GiB, "disk_gib": plan.disk_bytes / P.GiB,
                            "fits": P.misfit(plan) is None, "misfit": P.misfit(plan) or "",
                            "heaviest": max((p for p in plan.phases.items() if p[1].needed),
                                            key=lambda p: p[1].device_bytes)[0]})
    return out


def table(rs: list[dict]) -> str:
    lines = ["| model | calibration | budget GPU / host GiB | blocks on GPU / host / disk | peak GPU GiB | peak host "
             "GiB | disk GiB | heaviest GPU phase | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r['model']} | {r['calibration']} | {r['device_gib']} / {r['host_gib']} | {r['on_gpu']} / "
                     f"{r['in_host']} / {r['on_disk']} | {r['peak_device_gib']:.2f} | {r['peak_host_gib']:.2f} | "
                     f"{r['disk_gib']:.1f} | {r['heaviest']} | {'yes' if r['fits'] else 'no: ' + r['misfit']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rs = rows(Path(tmp))
    print(table(rs))
    write_json(BENCH / "offload.json", {"machine": machine(), "date": utc_date(), "rows": rs})
    if args.write:
        body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
                "bench/bench_offload.py --write` (bench/offload.json). The plan's placement of each model's blocks "
                "for `compress --offload --device-memory G --host-memory H --dtype bfloat16 --method dipsvd "
                "--allocation nested --refine sequential --ratio 0.2`, from its config alone, and the predicted "
                "peaks of the placed run; predicted on this CPU, nothing ran on a GPU. The host figures include "
                "this process's runtime (measured), so they move by a block or so between machines.\n\n" + table(rs))
        replace_section(RESULTS, SECTION, body, keep_from="### ")


if __name__ == "__main__":
    main()
