"""Markdown tables of one or more `moeoffload sensitivity` runs (for docs/sensitivity.md).

    python tools/sensitivity_tables.py study-gaussian/results.json study-szp/results.json ...

For each scope: one row per target, one column per (method, alpha), cells the
perplexity change in percent; real codecs add a bits-per-weight row.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from moeoffload.sensitivity import _target_order


def main(paths: list[str]) -> None:
    docs = [json.loads(open(p).read()) for p in paths]
    base = docs[0]["baseline"]
    print(f"Baseline: perplexity {base['ppl']:.4f}, next-token accuracy {100 * base['acc']:.2f}% "
          f"over {base['tokens']} held-out tokens.\n")
    cells = [c for d in docs for c in d["cells"]]
    for scope in ("expert", "layer", "group", "all"):
        sel = [c for c in cells if c["scope"] == scope]
        if not sel:
            continue
        cols = sorted({(c["method"], c["alpha"]) for c in sel}, key=lambda x: (["gaussian", "sz3", "szp"].index(x[0]), x[1]))
        table = defaultdict(dict)
        for c in sel:
            table[c["target"]][(c["method"], c["alpha"])] = c
        print(f"**scope {scope}** (Δ perplexity %; Δ accuracy in points below)\n")
        print("| target | " + " | ".join(f"{m} {a:g}" for m, a in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for target in sorted(table, key=_target_order):
            row = table[target]
            print(f"| {target} | " + " | ".join(f"{row[k]['dppl_pct']:+.2f}" if k in row else "" for k in cols) + " |")
        if scope in ("group", "all"):
            for target in sorted(table, key=_target_order):
                row = table[target]
                print(f"| {target} Δacc | " + " | ".join(f"{row[k]['dacc_pts']:+.2f}" if k in row else "" for k in cols) + " |")
        bits = {k: [c["bits_per_weight"] for c in sel if (c["method"], c["alpha"]) == k and c["bits_per_weight"]] for k in cols}
        if any(bits.values()):
            print("| bits/weight | " + " | ".join(f"{sum(v) / len(v):.2f}" if v else "-" for v in bits.values()) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
