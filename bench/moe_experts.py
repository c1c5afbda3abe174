"""One MoE layer's routed experts in one call (ops.moe_experts, the cpu backend's fused kernels), per
call: the shipped model's layer (8 experts, hidden 128, intermediate 224, top-2), 8 experts of
Qwen3-30B-A3B's shape (hidden 2048, intermediate 768, top-8), and 16 tiny experts (64 x 32, top-8:
overhead only); T = 1 (a decode step) and 4. Best of 3 after a warm-up.

    python bench/moe_experts.py [--out bench/results/moe_experts-cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import moeoffload
from moeoffload import codec, ops

SHAPES = (("shipped model", 8, 128, 224, 2), ("Qwen3-30B-A3B expert", 8, 2048, 768, 8), ("64 x 32", 16, 64, 32, 8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/moe_experts-cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, E, H, I, k in SHAPES:
        experts = [(codec.compress((torch.randn(2 * I, H, generator=g) * 0.05).to(torch.bfloat16), 0.003),
                    codec.compress((torch.randn(H, I, generator=g) * 0.05).to(torch.bfloat16), 0.003))
                   for _ in range(E)]
        for T in (1, 4):
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
            w = torch.rand(T, k, generator=g)
            n = 200 if H < 1000 else 10
            for _ in range(5):
                ops.moe_experts(x, idx, w, experts)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(n):
                    ops.moe_experts(x, idx, w, experts)
                best = min(best, (time.perf_counter() - start) / n)
            rows.append({"shape": name, "experts": E, "H": H, "I": I, "top_k": k, "tokens": T, "us_per_call": best * 1e6})
            print(f"{name:22s} T={T}: {best * 1e6:8.1f} us", flush=True)
    info = moeoffload.backend_info()
    head = (f"`python bench/moe_experts.py` on {platform.processor() or platform.machine()}, {info['num_threads']} "
            f"threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; microseconds per ops.moe_experts call "
            "(bf16, Python call included).")
    md = [head, "", "| layer | T | us/call |", "|---|---|---|"]
    md += [f"| {r['shape']} ({r['experts']} x [{2 * r['I']}, {r['H']}] + [{r['H']}, {r['I']}], top-{r['top_k']}) "
           f"| {r['tokens']} | {r['us_per_call']:.1f} |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "backend_info": info}, indent=1) + "\n")
    out.with_suffix(".md").write_text("# moe_experts on the cpu backend\n\n" + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
