"""The fused kernels on experts held in a device cache, against the dense bf16 experts on the same device:
what a decode step's expert compute costs once its experts are resident (no transfers in the timing).

    python bench/cached_experts.py [--out bench/results] [--tokens 1 4] [--experts 48] [--calls 24]

One MoE layer of Qwen3-30B-A3B's shape (--experts experts, hidden 2048, intermediate 768, top-8; bf16
weights with the per-matrix statistics of bench/e2e.py's checkpoint_like, szp at 0.3 x mean|w|), held in
an ExpertCache on the default backend (cuda where a GPU is), and per T tokens:
  - expert_mlp: one expert, fused (gate_up, act, down in two launches) from its szp slot;
  - moe_experts: 8 routed experts in one call (every token routed to the same 8, top-8);
  - dense: the same experts as bf16 tensors on the device, F.linear / silu * up / F.linear per expert.
Each timing is --calls calls back to back (the device never waits for the host between them), call k on
the next expert(s) round the layer, so that with 48 experts the weights (124 MB of szp, 450 MB of bf16)
do not stay in a GPU's L2 (50-60 MB) from one call to the next. Per row: microseconds a call (median of
--repeats such timings; CUDA events on a GPU), and the weight bytes a call reads over its time (szp's
bytes for the fused rows, bf16's for dense): against the device's memory bandwidth, how far the kernels
are from streaming their weights. Writes cached_experts-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moeoffload
from moeoffload import table as _table
from moeoffload.cache import ExpertCache
from moeoffload.ops import GATE_LAYOUTS, moe_experts_call

from e2e import checkpoint_like, device_name  # noqa: E402 (bench/ is the script's directory)

H, I, TOP_K = 2048, 768, 8


def experts_state_dict(E: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    gate_up = torch.stack([checkpoint_like((2 * I, H), "in", g) for _ in range(E)])
    down = torch.stack([checkpoint_like((H, I), "out", g) for _ in range(E)])
    return {"layers.0.experts.gate_up_proj": gate_up.bfloat16(), "layers.0.experts.down_proj": down.bfloat16()}


def timer(device: torch.device, repeats: int, calls: int):
    """fn(k) -> microseconds a call: calls k = 0 .. calls-1 back to back, median of `repeats`, after a warm-up."""
    def run(fn) -> float:
        for k in range(calls):
            fn(k)
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for k in range(calls):
                    fn(k)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3 / calls)
        else:
            for _ in range(repeats):
                t = time.perf_counter()
                for k in range(calls):
                    fn(k)
                times.append((time.perf_counter() - t) * 1e6 / calls)
        return statistics.median(times)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--experts", type=int, default=48, help="the layer's experts, >= 8 (48: past a GPU's L2)")
    ap.add_argument("--calls", type=int, default=24, help="calls back to back in one timing")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if args.experts < TOP_K or args.calls < 1 or args.repeats < 1 or min(args.tokens) < 1:
        ap.error(f"--experts must be >= {TOP_K}, --calls, --repeats and --tokens >= 1")
    E = args.experts

    g = torch.Generator().manual_seed(0)
    sd = experts_state_dict(E, g)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t = _table.build(sd, policy=0.3, mode="meanabs", progress=False, out=Path(tmp) / "t")
        names = t.matrix_names
        gu_m, dn_m = names.index("gate_up_proj"), names.index("down_proj")
        szp_bytes = [int(b) for b in t.expert_bytes()]
        cache = ExpertCache(t, budget=f"{2 * sum(szp_bytes)}B", prefetch=None)
        try:
            slots = [cache.acquire(0, e) for e in range(E)]
            for s in slots:
                s.wait()
            rows = measure(cache, sd, device, gu_m, dn_m, szp_bytes, args, E)
            for e in range(E):
                cache.release(0, e)
        finally:
            cache.close()
            t.close()

    meta = {"device": device_name(device), "backend": moeoffload.backend_info().get("cpu_isa") if device.type == "cpu"
            else "cuda", "torch": torch.__version__, "host": platform.machine(), "command": "python " + " ".join(sys.argv),
            "shape": {"experts": E, "hidden": H, "intermediate": I, "top_k": TOP_K}, "bound": "0.3 x mean|w|",
            "calls_per_timing": args.calls, "repeats": args.repeats,
            "szp_bits_per_weight": 8 * sum(szp_bytes) / (E * 3 * H * I)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device.type == "cpu" else "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_")
    stem = out / f"cached_experts-{slug}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table_md(rows, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def measure(cache, sd, device, gu_m, dn_m, szp_bytes, args, E: int) -> list[dict]:
    run = timer(device, args.repeats, args.calls)
    dense = [(sd["layers.0.experts.gate_up_proj"][e].to(device), sd["layers.0.experts.down_proj"][e].to(device))
             for e in range(E)]
    layout, act = GATE_LAYOUTS["concatenated"], "silu"
    h = cache.handle
    ids = [cache.expert_id(0, e) for e in range(E)]
    bf16_expert = 3 * H * I * 2
    rows = []
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16().to(device)
            # call k: expert k % E alone, or the 8 experts from 8k on, round the layer
            chosen = [[(TOP_K * k + j) % E for j in range(TOP_K)] for k in range(args.calls)]
            routing = [torch.tensor(c).repeat(T, 1) for c in chosen]
            weights = torch.full((T, TOP_K), 1.0 / TOP_K, device=device)

            def one_fused(k=0):
                e = ids[k % E]
                return torch.ops.moeoffload.expert_mlp(x, h, e, gu_m, h, e, dn_m, None, None, act, layout, 1.702, 7.0)

            def one_dense(k=0):
                gu = F.linear(x, dense[k % E][0])
                return F.linear(F.silu(gu[:, :I]) * gu[:, I:], dense[k % E][1])

            def layer_fused(k):
                return moe_experts_call(x, routing[k], weights, h, ids, gu_m, ids, dn_m, None, None, act, layout,
                                        1.702, 7.0)

            def layer_dense(k):
                y = torch.zeros_like(x)
                for j, e in enumerate(chosen[k]):
                    gu = F.linear(x, dense[e][0])
                    y += (F.linear(F.silu(gu[:, :I]) * gu[:, I:], dense[e][1]) * weights[:, j:j + 1]).to(x.dtype)
                return y

            # the fused kernel against the dense one on its own decoded weights (the kernel's error), and
            # those against the original weights (the bound's)
            decoded = [torch.ops.moeoffload.szp_decode(h, ids[0], m, device) for m in (gu_m, dn_m)]
            gu = F.linear(x, decoded[0])
            on_decoded = F.linear(F.silu(gu[:, :I]) * gu[:, I:], decoded[1]).float()
            scale = on_decoded.abs().max().item()
            kernel_err = (one_fused().float() - on_decoded).abs().max().item() / scale
            bound_err = (one_dense().float() - on_decoded).abs().max().item() / scale
            for what, fn, nbytes in (("expert_mlp fused (szp)", one_fused, szp_bytes[0]),
                                     ("expert_mlp dense (bf16)", one_dense, bf16_expert),
                                     ("moe_experts fused (szp, 8 experts)", layer_fused,
                                      round(TOP_K * sum(szp_bytes) / E)),
                                     ("8 experts dense (bf16)", layer_dense, TOP_K * bf16_expert)):
                us = run(fn)
                rows.append({"tokens": T, "what": what, "us": us, "weight_bytes": nbytes,
                             "weight_GBps": nbytes / us / 1e3, "kernel_rel_err": kernel_err,
                             "bound_rel_err": bound_err})
    return rows


def table_md(rows: list[dict], meta: dict) -> str:
    shape = meta["shape"]
    lines = [f"# The fused kernels on cache-held experts against dense bf16 ({meta['device']})", "",
             f"`{meta['command']}`", "",
             f"One layer of Qwen3-30B-A3B's shape ({shape['experts']} experts, hidden {H}, intermediate {I}), szp "
             f"at {meta['bound']} ({meta['szp_bits_per_weight']:.2f} bits/weight), held resident in an ExpertCache; "
             f"time a call ({meta['calls_per_timing']} calls back to back round the layer's experts, median of "
             f"{meta['repeats']}), and the weight bytes a call reads over that time (8-expert rows: the layer's "
             "mean).", "",
             "| tokens | call | µs | weight bytes | weight GB/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['what']} | {r['us']:.1f} | {r['weight_bytes']:,} | {r['weight_GBps']:.1f} |")
    lines += ["", "One expert, max |difference| / max |output|: the fused kernel against dense bf16 on the same "
              f"decoded weights {max(r['kernel_rel_err'] for r in rows):.3g} (the kernel's rounding); dense on the "
              f"original weights against dense on the decoded {max(r['bound_rel_err'] for r in rows):.3g} "
              "(the bound's)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
