"""Cache policies side by side on one trace: hit rate, demand misses, bytes moved, stalls.

    python bench/cache_policies.py            # writes bench/results/cache_policies.{json,md}

Rows: lru, lfu, activation (MoE-Infinity priority), activation + activation
prefetch, activation + hidden-state prefetch, activation + both combined,
and Belady's MIN (the best any demand-fetching cache can do), at budgets of
10%, 25% and 50% of all experts, on

Prefetch settings (flags): 3 layers ahead, up to 4 experts a layer of
predicted probability >= 0.02; the activation predictor averages the 4 best
matched past matrices with the sequence's own counts, each token's count
decaying by 0.5 per later token (--recency 1 gives the plain sequence-level
matrix; that row is in the table as "(plain)").

(a) synthetic traces (moeoffload.sim.synthetic_trace, parameters in the JSON):
    24 layers x 32 experts, top-2; each sequence follows one of 6 topics
    (Dirichlet(0.3) expert preference per layer) mixed 70/30 with a global
    Zipf(1) popularity, and a token keeps its previous token's experts at a
    layer with probability 0.4;
(b) real routing traces of the shipped tiny MoE (python/moeoffload/models/
    tiny-moe/routing-heldout.npy: which experts each held-out token chose),
    with hidden-state predictions computed from the model itself.

The first half of the sequences of each trace is history (the activation
matrices a deployment would have collected and saved with its table); the
second half is replayed. Time model: 100 us of compute per layer, copies over
one 25 GB/s link, expert payloads of the sizes stated per trace.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moeoffload import sim
from moeoffload.prefetch import PrefetchConfig, hidden_predictions

BUDGETS = (0.10, 0.25, 0.50)
SYNTHETIC = dict(num_sequences=80, tokens=64, num_layers=24, experts=32, k=2, topics=6, concentration=0.3,
                 zipf=1.0, topic_weight=0.7, stickiness=0.4, seed=0)


def run_trace(name: str, trace: np.ndarray, experts: int, expert_bytes: int, hidden: np.ndarray | None,
              prefetch: PrefetchConfig) -> list[dict]:
    half = trace.shape[0] // 2
    past, replayed = trace[:half], trace[half:]
    L = trace.shape[2]
    slot = -(-expert_bytes // 256) * 256
    rows = []
    for frac in BUDGETS:
        budget = int(round(frac * L * experts)) * slot
        configs = [("lru", None), ("lfu", None), ("activation", None),
                   ("activation", replace(prefetch, recency=1.0)),  # the plain sequence-level matrix
                   ("activation", prefetch)]
        if hidden is not None:
            for src in ("hidden", "combined"):
                configs.append(("activation", replace(prefetch, source=src)))
        for policy, pf in configs:
            t0 = time.perf_counter()
            r = sim.replay(replayed, expert_bytes, budget, policy, pf, history=sim.history_from_trace(past, experts),
                           hidden_predictions=hidden)
            label = policy if pf is None else f"{policy}+{pf.source}-prefetch" + (
                "(plain)" if pf.source == "activation" and pf.recency == 1.0 and prefetch.recency != 1.0 else "")
            row = {"trace": name, "budget_fraction": frac, "name": label,
                   **r.as_dict(), "replay_seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"  {name:9s} {frac:4.0%} {row['name']:28s} hit {row['hit_rate']:.3f}  misses {row['demand_misses']:6d}"
                  f"  moved {row['bytes_moved'] / 2**20:9.1f} MiB  stalls {row['stalls']:6d}", flush=True)
        b = sim.belady(replayed, expert_bytes, budget)
        rows.append({"trace": name, "budget_fraction": frac, "name": "belady", **b})
        print(f"  {name:9s} {frac:4.0%} {'belady':28s} hit {b['hit_rate']:.3f}  misses {b['demand_misses']:6d}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| trace | budget | policy | hit rate | demand misses | MiB moved | stalls | stall ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stall_ms = f"{1000 * r['stall_seconds']:.1f}" if "stall_seconds" in r else "-"
        stalls = str(r.get("stalls", "-"))
        out.append(f"| {r['trace']} | {r['budget_fraction']:.0%} | {r['name']} | {r['hit_rate']:.3f} | "
                   f"{r['demand_misses']} | {r['bytes_moved'] / 2**20:.1f} | {stalls} | {stall_ms} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[dict]:
    """At 25%: activation + prefetch within 10 points of Belady, >= 1.3x fewer demand misses than LRU."""
    out = []
    for trace in sorted({r["trace"] for r in rows}):
        sel = {r["name"]: r for r in rows if r["trace"] == trace and r["budget_fraction"] == 0.25}
        act, lru, bel = sel["activation+activation-prefetch"], sel["lru"], sel["belady"]
        out.append({"trace": trace, "belady_hit": bel["hit_rate"], "activation_prefetch_hit": act["hit_rate"],
                    "gap_points": 100 * (bel["hit_rate"] - act["hit_rate"]),
                    "within_10_points": 100 * (bel["hit_rate"] - act["hit_rate"]) <= 10,
                    "miss_reduction_vs_lru": lru["demand_misses"] / max(act["demand_misses"], 1),
                    "at_least_1.3x": lru["demand_misses"] / max(act["demand_misses"], 1) >= 1.3})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--per-layer", type=int, default=4)
    ap.add_argument("--min-probability", type=float, default=0.02)
    ap.add_argument("--recency", type=float, default=0.5,
                    help="decay per token of the sequence's own counts in the activation predictor (1: plain counts)")
    ap.add_argument("--real-sequences", type=int, default=96, help="sequences of the real trace to use (half replayed)")
    ap.add_argument("--traces", default="synthetic,real", help="which traces: synthetic, real, or both")
    args = ap.parse_args()
    which = set(args.traces.split(","))
    pf = PrefetchConfig(depth=args.depth, per_layer=args.per_layer, min_probability=args.min_probability,
                        recency=args.recency)
    rows = []
    if "synthetic" in which:
        print("(a) synthetic trace", flush=True)
        syn = sim.synthetic_trace(**SYNTHETIC)
        rows += run_trace("synthetic", syn, SYNTHETIC["experts"], 1 << 20, None, pf)

    from moeoffload import table as table_mod
    from moeoffload.models import tiny_moe

    real_info = None
    trace_file = tiny_moe.DEFAULT_DIR / "routing-heldout.npy"
    if "real" in which and trace_file.exists():
        print("(b) real routing traces of the tiny MoE", flush=True)
        real = np.load(trace_file)[: args.real_sequences]
        model = tiny_moe.load()
        E = model.config.num_local_experts
        built = table_mod.build(model.state_dict(), policy=0.3, mode="meanabs", progress=False)
        expert_bytes = int(built.expert_bytes().max())
        half = real.shape[0] // 2
        ids = tiny_moe.windows(tiny_moe.default_heldout(), 256)[: real.shape[0]]
        hidden = hidden_predictions(model, ids)[half:]
        rows += run_trace("tiny-moe", real, E, expert_bytes, hidden, pf)
        real_info = {"file": str(trace_file.relative_to(Path(__file__).resolve().parents[1])), "shape": list(real.shape),
                     "expert_bytes": expert_bytes, "table_bound": "0.3 x mean|w| (szp)"}
    verdict = targets(rows)
    out_name = "cache_policies" if which == {"synthetic", "real"} else "cache_policies-" + "-".join(sorted(which))
    doc = {"command": "python bench/cache_policies.py " + " ".join(sys.argv[1:]), "machine": platform.processor() or platform.machine(),
           "synthetic": SYNTHETIC, "real": real_info, "prefetch": pf.__dict__,
           "time_model": {"layer_seconds": 1e-4, "link_bytes_per_s": 25e9}, "rows": rows, "targets_at_25pct": verdict}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{out_name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = ["# Cache policies (bench/cache_policies.py)", "", f"Command: `{doc['command'].strip()}`", "",
          table(rows), "", "Targets at 25% budget:", ""]
    for v in verdict:
        md.append(f"- {v['trace']}: activation+prefetch hit {v['activation_prefetch_hit']:.3f} vs Belady "
                  f"{v['belady_hit']:.3f} ({v['gap_points']:.1f} points; within 10: {v['within_10_points']}); "
                  f"{v['miss_reduction_vs_lru']:.2f}x fewer demand misses than LRU (>= 1.3: {v['at_least_1.3x']})")
    (args.out / f"{out_name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[6:]))


if __name__ == "__main__":
    main()
