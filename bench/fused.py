"""Fused szp linear / expert MLP against dense bf16 and decompress + dense, in one run.

    python bench/fused.py [--out bench/results/fused-cpu.json] [--repeats 5] [--quick]

For Mixtral-8x7B (14336x4096, 4096x14336), Qwen3-30B-A3B (768x2048, 2048x768)
and the shipped tiny model's expert matrices, T = 1/4/16/64 tokens: fused
``szp_linear`` vs (a) torch bf16 ``F.linear`` on the same matrix and (b) szp
decompress + ``F.linear``; at eb = 0.1 sigma (random weights, sigma 0.02) and,
for the shipped model, at the shipped policy's bounds. Then ``expert_mlp``
against the dense bf16 expert. Median of --repeats after a warm-up. Prints a
markdown table and writes JSON (device named).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moeoffload
from moeoffload import codec, ops

TOKENS = (1, 4, 16, 64)


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def linear_rows(name, w, eb, repeats, tokens):
    ct = codec.compress(w, eb)
    dec = torch.empty(w.shape, dtype=w.dtype)
    rows = []
    for T in tokens:
        x = torch.randn(T, w.shape[1]).to(torch.bfloat16)
        fused = timed(lambda: ops.szp_linear(x, ct, direct=True), repeats)
        op = timed(lambda: ops.szp_linear(x, ct), repeats)
        dense = timed(lambda: F.linear(x, w), repeats)
        dec_lin = timed(lambda: F.linear(x, ct.decompress(out=dec)), repeats)
        rows.append({"matrix": name, "shape": list(w.shape), "tokens": T, "eb": eb, "bits_per_weight": ct.bits_per_value,
                     "fused_ms": fused, "fused_op_ms": op, "dense_bf16_ms": dense, "decompress_linear_ms": dec_lin,
                     "speedup_vs_dense": dense / fused, "speedup_vs_decompress": dec_lin / fused})
        print(f"| {name} | {T} | {ct.bits_per_value:.2f} | {fused:.2f} | {op:.2f} | {dense:.2f} | {dec_lin:.2f} | "
              f"{dense / fused:.2f}x | {dec_lin / fused:.2f}x |", flush=True)
    return rows


def mlp_rows(name, H, I, eb_sigma, repeats, tokens):
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(2 * I, H, generator=g) * 0.02).to(torch.bfloat16)
    dn = (torch.randn(H, I, generator=g) * 0.02).to(torch.bfloat16)
    cgu, cdn = codec.compress(gu, eb_sigma * 0.02), codec.compress(dn, eb_sigma * 0.02)
    rows = []
    for T in tokens:
        x = torch.randn(T, H).to(torch.bfloat16)

        def dense():
            a, b = F.linear(x, gu).chunk(2, dim=-1)
            return F.linear(F.silu(a) * b, dn)

        fused = timed(lambda: ops.expert_mlp(x, cgu, cdn), repeats)
        d = timed(dense, repeats)
        rows.append({"expert": name, "H": H, "I": I, "tokens": T, "fused_ms": fused, "dense_bf16_ms": d,
                     "speedup_vs_dense": d / fused})
        print(f"| {name} | {T} | {fused:.2f} | {d:.2f} | {d / fused:.2f}x |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fused-cpu.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="T = 1 and 16 only")
    args = ap.parse_args()
    tokens = (1, 16) if args.quick else TOKENS
    info = moeoffload.backend_info()
    print(f"device: {platform.processor() or platform.machine()}, {info['num_threads']} threads, "
          f"SIMD path {info['cpu_isa']}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print("| matrix | T | bits/w | fused ms | fused (op) ms | dense bf16 ms | decompress+linear ms | vs dense | vs decompress |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    rows = []
    shapes = [("mixtral w1/w3", (14336, 4096)), ("mixtral w2", (4096, 14336)),
              ("qwen3-30b-a3b gate/up", (768, 2048)), ("qwen3-30b-a3b down", (2048, 768))]
    for name, shape in shapes:
        w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
        rows += linear_rows(name + " eb=0.1s", w, 0.1 * 0.02, args.repeats, tokens)

    from moeoffload import table as table_mod
    from moeoffload.models import tiny_moe
    from moeoffload.policy import BoundPolicy

    model = tiny_moe.load()
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    built = table_mod.build(sd, BoundPolicy.from_any(tiny_moe.DEFAULT_DIR / "policy.json"), progress=False)
    for matrix in built.matrix_names:
        ref = next(m for m in built.entry(0, 0)["matrices"] if m["name"] == matrix)
        w = sd[ref["source"]] if ref["index"] is None else sd[ref["source"]][ref["index"]]
        rows += linear_rows(f"tiny-moe L0E0 {matrix} (policy)", w.contiguous(), ref["eb"], args.repeats, tokens)

    print("\n| expert (silu, bf16) | T | fused expert_mlp ms | dense bf16 ms | vs dense |")
    print("|---|---|---|---|---|")
    mlps = mlp_rows("qwen3-30b-a3b", 2048, 768, 0.1, args.repeats, tokens)
    mlps += mlp_rows("mixtral-8x7b", 4096, 14336, 0.1, max(1, args.repeats // 2), tokens[:2])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": {"cpu": platform.processor() or platform.machine(), **info},
                               "command": "python bench/fused.py", "linear": rows, "expert_mlp": mlps}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
