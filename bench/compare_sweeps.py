"""Compare two sweep reports (`python -m dipsvd_core sweep --out-json ...`) row by row: the same rows, the same
per-matrix ranks, the same realized ratio and the same perplexities. Used to check that a refactor leaves
behaviour unchanged (bench/RESULTS.md, "Registries").

usage: .venv/bin/python bench/compare_sweeps.py BEFORE.json AFTER.json [--rel 1e-9]
Prints one Markdown table; exits 1 when any row differs.
"""
from __future__ import annotations

import argparse
import json
import sys


def rows_of(report: dict) -> dict:
    return {(r["method"], r["allocation"], r["ratio"]): r for r in report["rows"]}


def differences(a: dict, b: dict, rel: float) -> list[str]:
    """What differs between two rows of the same key, in words ([] when nothing does)."""
    out = []
    if a.get("ranks") != b.get("ranks"):
        changed = [n for n in a.get("ranks", {}) if a["ranks"][n] != b.get("ranks", {}).get(n)]
        out.append(f"ranks of {len(changed)} matrices")
    if a["ratio_realized"] != b["ratio_realized"]:
        out.append(f"realized {a['ratio_realized']} vs {b['ratio_realized']}")
    for s, v in a["ppl"].items():
        w = b["ppl"].get(s)
        if w is None or abs(v - w) > rel * abs(v):
            out.append(f"ppl {s} {v:.6g} vs {w if w is None else f'{w:.6g}'}")
    return out


def compare(before: dict, after: dict, rel: float) -> tuple[str, bool]:
    ra, rb = rows_of(before), rows_of(after)
    sets = before["eval_sets"]
    lines = ["| method | allocation | ratio | " + " | ".join(f"ppl {s} before / after" for s in sets)
             + " | ranks | verdict |", "|" + "---|" * (5 + len(sets))]
    ok = set(ra) == set(rb)
    orig = [f"{before['original_ppl'][s]:.4f} / {after['original_ppl'][s]:.4f}" for s in sets]
    same_orig = all(abs(before["original_ppl"][s] - after["original_ppl"][s]) <= rel * before["original_ppl"][s]
                    for s in sets)
    ok &= same_orig
    lines.append(f"| original | - | 0 | {' | '.join(orig)} | - | {'same' if same_orig else 'DIFFERS'} |")
    for key in sorted(set(ra) | set(rb), key=lambda k: (k[2], k[0], k[1])):
        a, b = ra.get(key), rb.get(key)
        if a is None or b is None:
            ok = False
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join("-" for _ in sets)
                         + f" | - | only {'after' if a is None else 'before'} |")
            continue
        diff = differences(a, b, rel)
        ok &= not diff
        ppl = [f"{a['ppl'][s]:.4f} / {b['ppl'][s]:.4f}" for s in sets]
        ranks = "same" if a.get("ranks") == b.get("ranks") else "differ"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {' | '.join(ppl)} | {ranks} | "
                     f"{'same' if not diff else 'DIFFERS: ' + '; '.join(diff)} |")
    return "\n".join(lines) + "\n", ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rel", type=float, default=1e-9, help="relative tolerance on perplexity (default 1e-9)")
    args = ap.parse_args()
    before, after = (json.load(open(p)) for p in (args.before, args.after))
    table, ok = compare(before, after, args.rel)
    print(table + ("every row is the same" if ok else "ROWS DIFFER"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
