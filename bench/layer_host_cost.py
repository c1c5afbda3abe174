"""Host time of the offload path per MoE layer, where the experts' compute costs nothing.

    python bench/layer_host_cost.py [--tokens 24] [--compile] [--out bench/results/layer_host_cost-cpu]

A Qwen3-30B-A3B-shaped routing (48 layers x 128 experts, top-8) with matrices of 64 x 32, so what is
timed is the machinery a decode step runs around the experts at every MoE layer: the router's ids to
the host, acquire and release of the routed experts (one call each), the decision step (record, predict, plan,
prefetch), the hidden-state prediction, and the moe_experts call. On a GPU the experts' compute runs
on the device while the host does this, so 48 x (host time per layer) is a floor under the time of a
decode token: at 80 tokens/s a token has 12.5 ms, 260 us a layer for everything. The resident model
(transformers' eager loop over the experts, same shapes) runs in the same run as the baseline.
Each part is timed by wrapping it (the wrapper costs about a microsecond a call). Writes <out>.json
and <out>.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import transformers

import moeoffload
from moeoffload import ops
from moeoffload.integrations import hf

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=48,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=128, num_experts_per_tok=8,
              max_position_embeddings=512)


def model(experts_implementation: str = "eager"):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**CONFIG)
    return transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), experts_implementation=experts_implementation).to(torch.bfloat16).eval()


def decode_ms(m, ids, tokens: int, warm_tokens: int = 4, **generate_kw) -> float:
    with torch.no_grad():
        m.generate(ids, max_new_tokens=warm_tokens, min_new_tokens=warm_tokens, do_sample=False, **generate_kw)
        start = time.perf_counter()
        m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **generate_kw)
    return (time.perf_counter() - start) / tokens * 1e3


def compiled_rows(ids, tokens: int) -> dict:
    """Decode ms/token with a static KV cache, eager and under torch.compile (inductor) in the same run:
    the resident model with transformers' batched_mm experts (traceable), and the offload path, whose
    experts are one opaque op (moeoffload::offload_experts) in the compiled graph. What compile takes off
    is the per-op overhead of everything around the experts."""
    rows = {}
    for name in ("resident (batched_mm)", "offload, prefetch activation"):
        for compiled in (False, True):
            torch._dynamo.reset()
            m = model(experts_implementation="batched_mm") if name.startswith("resident") else model()
            off = None if name.startswith("resident") else moeoffload.offload(
                m, codec="szp", error_bound=0.3, gpu_budget=10**9, prefetch="activation")
            try:
                if compiled:
                    m.forward = torch.compile(m.forward, dynamic=False)
                start = time.perf_counter()
                # the warm-up decodes as many tokens: a static cache of another length is another graph
                ms = decode_ms(m, ids, tokens, warm_tokens=tokens, cache_implementation="static")
                rows[f"{name}, static cache, {'torch.compile' if compiled else 'eager'}"] = {
                    "ms_per_token": ms, "first_call_s": time.perf_counter() - start}
            finally:
                if off is not None:
                    off.close()
    return rows


def timed_parts(off, ids, tokens: int) -> tuple[float, dict, int]:
    """ms per token, and microseconds per MoE layer call of each wrapped part."""
    spent, calls = collections.Counter(), collections.Counter()
    restore, keys = [], []  # keys in the order the table shows them

    def wrap(obj, name, key):
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
                calls[key] += 1

        restore.append((obj, name, f, name in vars(obj)))  # own attribute, or looked up on its class
        keys.append(key)
        setattr(obj, name, timed)

    wrap(hf.Offload, "_forward", "the layer's experts part, all")
    wrap(ops, "moe_experts_call", "moe_experts call")
    wrap(off.cache, "acquire_ahead", "acquire the routed experts")
    wrap(off.cache, "release_all", "release them")
    wrap(off.cache, "record", "decision step (record)")
    wrap(off, "_next_scores", "hidden-state prediction")
    try:
        with torch.no_grad():
            off.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            spent.clear()
            calls.clear()
            start = time.perf_counter()
            off.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            ms = (time.perf_counter() - start) / tokens * 1e3
    finally:
        for obj, name, f, own in reversed(restore):
            if own:
                setattr(obj, name, f)
            else:
                delattr(obj, name)
    layers = calls["the layer's experts part, all"]
    return ms, {key: {"us_per_layer": spent[key] / layers * 1e6, "calls_per_layer": calls[key] / layers}
                for key in keys}, layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="bench/results/layer_host_cost-cpu")
    ap.add_argument("--compile", action="store_true",
                    help="also decode with a static cache, eager and under torch.compile (minutes of compiling)")
    args = ap.parse_args(argv)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    rows = {"resident": {"ms_per_token": decode_ms(model(), ids, args.tokens)}}
    for prefetch in (None, "hidden"):
        m = model()
        with moeoffload.offload(m, codec="szp", error_bound=0.3, gpu_budget=10**9, prefetch=prefetch) as off:
            ms, parts, layers = timed_parts(off, ids, args.tokens)
        rows[f"offload, prefetch {prefetch}"] = {"ms_per_token": ms, "parts": parts, "moe_layer_calls": layers}
    lines = [f"`python bench/layer_host_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
             f"{CONFIG['num_hidden_layers']} layers x {CONFIG['num_experts']} experts, top-"
             f"{CONFIG['num_experts_per_tok']}, cpu backend, every expert cached.", "",
             "| system | ms/token | " + " | ".join(rows["offload, prefetch None"]["parts"]) + " |",
             "|---|---|" + "---|" * len(rows["offload, prefetch None"]["parts"])]
    for name, r in rows.items():
        cells = [f"{p['us_per_layer']:.0f} us ({p['calls_per_layer']:.1f})" for p in r["parts"].values()] \
            if "parts" in r else [""] * len(rows["offload, prefetch None"]["parts"])
        lines.append(f"| {name} | {r['ms_per_token']:.1f} | " + " | ".join(cells) + " |")
    if args.compile:
        extra = compiled_rows(ids, args.tokens)
        rows.update(extra)
        lines += ["", "| system | ms/token | first generate (compiling), s |", "|---|---|---|"]
        lines += [f"| {name} | {r['ms_per_token']:.1f} | {r['first_call_s']:.0f} |" for name, r in extra.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": CONFIG, "rows": rows,
                                                    "backend_info": moeoffload.backend_info()}, indent=1) + "\n")
    out.with_suffix(".md").write_text("# Host time per MoE layer of the offload path\n\n"
                                      "Microseconds per MoE layer call (calls per layer call in brackets).\n\n"
                                      + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
