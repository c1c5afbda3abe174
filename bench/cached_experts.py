"""The fused kernels on experts held in a device cache, against the dense bf16 experts on the same device:
what a decode step's expert compute costs once its experts are resident (no transfers in the timing).

    python bench/cached_experts.py [--out bench/results] [--tokens 1 4] [--repeats 50]

One MoE layer of Qwen3-30B-A3B's shape (8 experts, hidden 2048, intermediate 768, bf16 weights with the
per-matrix statistics of bench/e2e.py's checkpoint_like, szp at 0.3 x mean|w|), held in an ExpertCache on
the default backend (cuda where a GPU is), and per T tokens:
  - expert_mlp: one expert, fused (gate_up, act, down in two launches) from its szp slot;
  - moe_experts: the layer's 8 routed experts in one call (every token routed to all 8, top-8);
  - dense: the same experts as bf16 tensors on the device, F.linear / silu * up / F.linear per expert.
Per row: microseconds a call (median; CUDA events on a GPU), and the weight bytes the call reads over its
time (szp's bytes for the fused rows, bf16's for dense): against the device's memory bandwidth this is how
far the kernels are from streaming their weights. Writes cached_experts-<device>.json and .md.
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

E, H, I, TOP_K = 8, 2048, 768, 8


def experts_state_dict(g: torch.Generator) -> dict[str, torch.Tensor]:
    gate_up = torch.stack([checkpoint_like((2 * I, H), "in", g) for _ in range(E)])
    down = torch.stack([checkpoint_like((H, I), "out", g) for _ in range(E)])
    return {"layers.0.experts.gate_up_proj": gate_up.bfloat16(), "layers.0.experts.down_proj": down.bfloat16()}


def timer(device: torch.device, repeats: int):
    """fn -> median microseconds a call, after a warm-up."""
    def run(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            return statistics.median(times)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    sd = experts_state_dict(g)
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
            rows = measure(cache, sd, device, gu_m, dn_m, szp_bytes, args)
            for e in range(E):
                cache.release(0, e)
        finally:
            cache.close()
            t.close()

    meta = {"device": device_name(device), "backend": moeoffload.backend_info().get("cpu_isa") if device.type == "cpu"
            else "cuda", "torch": torch.__version__, "host": platform.machine(), "command": "python " + " ".join(sys.argv),
            "shape": {"experts": E, "hidden": H, "intermediate": I, "top_k": TOP_K}, "bound": "0.3 x mean|w|",
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


def measure(cache, sd, device, gu_m, dn_m, szp_bytes, args) -> list[dict]:
    run = timer(device, args.repeats)
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
            routing = torch.arange(TOP_K).repeat(T, 1)
            weights = torch.full((T, TOP_K), 1.0 / TOP_K, device=device)

            def one_fused():
                return torch.ops.moeoffload.expert_mlp(x, h, ids[0], gu_m, h, ids[0], dn_m, None, None, act, layout,
                                                       1.702, 7.0)

            def one_dense():
                gu = F.linear(x, dense[0][0])
                return F.linear(F.silu(gu[:, :I]) * gu[:, I:], dense[0][1])

            def layer_fused():
                return moe_experts_call(x, routing, weights, h, ids, gu_m, ids, dn_m, None, None, act, layout, 1.702, 7.0)

            def layer_dense():
                y = torch.zeros_like(x)
                for e in range(E):
                    gu = F.linear(x, dense[e][0])
                    y += (F.linear(F.silu(gu[:, :I]) * gu[:, I:], dense[e][1]) * weights[:, e:e + 1]).to(x.dtype)
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
                                     ("moe_experts fused (szp, 8 experts)", layer_fused, sum(szp_bytes)),
                                     ("8 experts dense (bf16)", layer_dense, E * bf16_expert)):
                us = run(fn)
                rows.append({"tokens": T, "what": what, "us": us, "weight_bytes": nbytes,
                             "weight_GBps": nbytes / us / 1e3, "kernel_rel_err": kernel_err,
                             "bound_rel_err": bound_err})
    return rows


def table_md(rows: list[dict], meta: dict) -> str:
    lines = [f"# The fused kernels on cache-held experts against dense bf16 ({meta['device']})", "",
             f"`{meta['command']}`", "",
             f"One layer of Qwen3-30B-A3B's shape ({E} experts, hidden {H}, intermediate {I}), szp at "
             f"{meta['bound']} ({meta['szp_bits_per_weight']:.2f} bits/weight), held resident in an ExpertCache; "
             "median time a call, and the weight bytes the call reads over that time.", "",
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
