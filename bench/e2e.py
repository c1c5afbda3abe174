"""End-to-end offloaded decoding against the systems a user would pick instead, in one run.

    python bench/e2e.py                                   # the shipped model, budgets 10/25/50%
    python bench/e2e.py --shape mixtral --layers 2 --budgets 25 50 --new-tokens 8 --prompts 2
    python bench/e2e.py --shape qwen3 --layers 16 --budgets 25 50 --routing model trace   # the GPU run
    python bench/e2e.py --model path/to/checkpoint --budgets 25 50

Systems, same prompts, same budget (bytes of device memory for experts: a share of the experts'
bf16 bytes, so compression buys room), same run:
  resident      the uncompressed model, every expert in device memory: the ceiling and the quality
                reference;
  accelerate    the `accelerate` package's device_map offload with max_memory = the budget (on a
                CUDA device only: on the cpu backend device memory is host memory);
  naive         bf16 experts fetched when routed, no cache (a budget of top-k slots, lru, no prefetch);
  lru-bf16      bf16 expert cache with LRU, pinned host copies (mixtral-offloading's design without
                its quantisation): codec none, lru, no prefetch;
  moeoffload    szp experts, fused kernels, activation cache policy, hidden-state prefetch;
  moeoffload-noprefetch   the same without prefetch, so each part's share shows.
  moeoffload-szpe   as moeoffload, the experts entropy coded (szpe) in host memory and over the bus and
                transcoded into szp as they land (the cache holds szp; issue 12's placement (a)).
  moeoffload-compiled   as moeoffload, the model's forward under torch.compile (the experts one opaque
                op, the rest fused by inductor) with a static KV cache; its first generation, which
                compiles, is an extra warm-up.

Per system: prefill and decode tokens/s (and s/token), bytes over the bus per decode token, decode
hit rate, stall fraction of decode time, peak device bytes (on cpu: the model's weights on the device
+ the cache's peak use; on cuda: torch's peak allocation less the resident reference model kept for
the perplexities, + the budget the cache reserves), and the perplexity of each generated
continuation under the resident model (a faster system cannot win by being wrong). Writes <out>.json, <out>.md and <out>-*.png.

Routing: "model" lets the routers route (random routers route nearly uniformly); "trace" drives every
router from a synthetic trace with the locality of real models (TraceRouting; the generator is
moeoffload.sim.synthetic_trace), whose first sequences are loaded as the recorded activation history;
the moeoffload system then prefetches from that history (a trace is not a function of the hidden state).
Shaped stacks (--shape) have random weights with the per-matrix statistics of trained FFN matrices
(WEIGHT_STATS, checkpoint_like), no download.

On the cpu backend (this machine) the "device" is host memory and the bus a memcpy: the table shows
what the kernels and the cache decisions cost, not what PCIe costs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parents[1]

import moeoffload
from moeoffload.cache import slot_bytes
from moeoffload.cli.run import generate_timed
from moeoffload.models.adapters import moe_layers
from moeoffload.ops import UNSAFE_IN_CUDA_GRAPHS
from moeoffload.sim import activation_matrices, synthetic_trace

SYSTEMS = ("resident", "accelerate", "naive", "lru-bf16", "moeoffload", "moeoffload-noprefetch", "moeoffload-szpe",
           "moeoffload-compiled")
OFFLOADED = {  # offload() settings of the systems this project's runtime serves
    "naive": dict(codec="none", cache_policy="lru", prefetch=None),
    "lru-bf16": dict(codec="none", cache_policy="lru", prefetch=None),
    "moeoffload": dict(codec="szp", cache_policy="activation", prefetch="hidden"),
    "moeoffload-noprefetch": dict(codec="szp", cache_policy="activation", prefetch=None),
    # szpe placement (a): entropy-coded in host memory and over the bus, transcoded to szp on arrival
    "moeoffload-szpe": dict(codec="szpe", cache_policy="activation", prefetch="hidden"),
    "moeoffload-compiled": dict(codec="szp", cache_policy="activation", prefetch="hidden"),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# The published models' depth: a --shape stack of fewer layers also reports its decode rate scaled to it.
FULL_LAYERS = {"mixtral": 32, "qwen3": 48}

SHAPES = {  # the published configs' MoE shapes; vocabulary cut to 1024 (no download, small embeddings)
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3": ("Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                                     num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                     mlp_only_layers=[])),
}

# Per-matrix statistics of trained FFN weights, measured on the only trained FFN matrices this machine has
# offline (all-MiniLM-L6-v2, moeoffload.samples): input-side matrices (up/gate) have std 1.1-1.4 / sqrt(fan_in)
# and mild tails (excess kurtosis 0.3-1.8); output-side matrices (down) have std 1.5-1.9 / sqrt(fan_in) and
# heavy tails (excess kurtosis 13-1600, single weights at 20-175 sigma). The generator: Tukey-h samples
# z * exp(h z^2 / 2) (h = 0.06 in, excess kurtosis ~1; h = 0.15 out, ~7) scaled to c / sqrt(fan_in) with c
# log-normal around 1.25 (in) / 1.7 (out), sigma 0.1 per matrix, and 4 outliers at 20-100 sigma per down matrix.
WEIGHT_STATS = {"in": (0.06, 1.25), "out": (0.15, 1.7)}


def checkpoint_like(shape: tuple[int, int], role: str, g: torch.Generator, outliers: int = 4) -> torch.Tensor:
    """An [out, in] weight with the per-matrix statistics above, float32."""
    h, c = WEIGHT_STATS[role]
    fan_in = shape[-1]
    z = torch.randn(shape, generator=g)
    w = z * torch.exp(0.5 * h * z * z)
    scale = c * math.exp(0.1 * torch.randn((), generator=g).item()) / math.sqrt(fan_in) * (1 - 2 * h) ** 0.75
    w *= scale  # Tukey-h variance is (1 - 2h)^-1.5
    if role == "out":
        at = torch.randint(0, w.numel(), (outliers,), generator=g)
        sign = torch.randint(0, 2, (outliers,), generator=g) * 2 - 1
        w.view(-1)[at] = sign * (20 + 80 * torch.rand(outliers, generator=g)) * (c / math.sqrt(fan_in))
    return w


def shaped_stack(shape: str, layers: int, out: Path) -> Path:
    """A checkpoint of `layers` decoder layers with the MoE shape of `shape` (SHAPES) and a 1024-token
    vocabulary: non-expert weights from transformers' init, expert weights from checkpoint_like, bf16
    safetensors. Qwen3-30B-A3B: 2048 hidden, 128 experts of intermediate 768, top-8 (1.13 GiB of bf16 experts
    per layer); Mixtral-8x7B: 4096 hidden, 8 experts of intermediate 14336, top-2 (2.63 GiB per layer)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    cls, kw = SHAPES[shape]
    config = getattr(transformers, cls)(vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ml in moe_layers(model):
            for name, p in ml.experts.named_parameters():
                role = "out" if "down" in name else "in"
                for e in range(p.shape[0]):  # one expert at a time: float32 temporaries stay small
                    p[e].copy_(checkpoint_like(tuple(p.shape[1:]), role, g))
    model.save_pretrained(out)
    del model
    return out


class TraceRouting:
    """Drives every MoE layer's routing from a trace [S, T, L, k] (moeoffload.sim.synthetic_trace): a
    forward hook on each router replaces its top-k indices with the trace's and its weights with the
    router's own softmax probabilities of those experts (renormalised), so the experts compute as usual
    on the trace's choices. begin(s) starts sequence s at token 0; each router call consumes its tokens.
    Under torch.compile the hook is one opaque op (e2e_bench::trace_route), so the graph neither breaks
    at a router nor bakes one call's choices in."""

    _live: dict[int, "TraceRouting"] = {}

    def __init__(self, model, trace: np.ndarray):
        self.trace, self.seq, self.hooks = trace, 0, []
        self.pos = [0] * trace.shape[2]
        self.key = id(self)
        TraceRouting._live[self.key] = self
        for ml in moe_layers(model):
            if ml.router is None:
                raise SystemExit(f"--routing trace: {ml.name} has no router to drive")
            self.hooks.append(ml.router.register_forward_hook(self._hook(ml.index)))

    def begin(self, seq: int) -> None:
        self.seq, self.pos = seq, [0] * len(self.pos)

    def route(self, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, layer: int):
        n, start = index.shape[0], self.pos[layer]
        if start + n > self.trace.shape[1]:
            raise RuntimeError(f"the trace has {self.trace.shape[1]} tokens a sequence; this one ran past it")
        self.pos[layer] = start + n
        chosen = torch.from_numpy(self.trace[self.seq, start : start + n, layer].astype(np.int64)).to(index.device)
        probs = torch.softmax(logits.float(), dim=-1).gather(1, chosen)
        return (probs / probs.sum(-1, keepdim=True)).to(weights.dtype), chosen.to(index.dtype)

    def _hook(self, layer: int):
        key = self.key

        def hook(module, args, output):
            logits, weights, index = output
            if torch.compiler.is_compiling():
                weights, index = torch.ops.e2e_bench.trace_route(logits, weights, index, key, layer)
            else:
                weights, index = self.route(logits, weights, index, layer)
            return logits, weights, index
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        TraceRouting._live.pop(self.key, None)


# host work (the trace's choices for this step): never inside a captured CUDA graph
@torch.library.custom_op("e2e_bench::trace_route", mutates_args=(), tags=UNSAFE_IN_CUDA_GRAPHS)
def _trace_route(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, key: int,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return TraceRouting._live[key].route(logits, weights, index, layer)


@_trace_route.register_fake
def _(logits, weights, index, key, layer):
    return torch.empty_like(weights), torch.empty_like(index)


def prompts_for(model_dir: Path, config, count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens: slices of the shipped model's held-out text, else random ids."""
    held = model_dir / "heldout.txt"
    bos = getattr(config, "bos_token_id", None)
    if held.exists():
        from moeoffload import evaluation

        ids = evaluation.encode(model_dir, None, held.read_bytes()[: 64 * count * length])
        step = max(len(ids) // count, length)
        out = [ids[i * step : i * step + length] for i in range(count)]
    else:
        g = torch.Generator().manual_seed(1)
        out = [torch.randint(0, config.vocab_size, (length,), generator=g).tolist() for _ in range(count)]
    return [torch.tensor([([bos] if bos is not None else []) + p[: length - (bos is not None)]]) for p in out]


@torch.no_grad()
def continuation_perplexity(reference, prompt: torch.Tensor, tokens: list[int]) -> float:
    """exp(mean NLL) of `tokens` after `prompt` under the reference model."""
    if not tokens:
        return float("nan")
    ids = torch.cat([prompt, torch.tensor([tokens])], 1).to(next(reference.parameters()).device)
    logits = reference(ids).logits[0, prompt.shape[1] - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, prompt.shape[1]:])
    return math.exp(nll.item())


def device_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def run_system(name, model_dir, prompts, new_tokens, budget, tables, device, dtype, reference, bound, top_k, tmp,
               trace=None):
    """One system's row. trace: (trace [S, T, L, k], history sequences H) drives the routing: sequences
    0..H-1 are the recorded history (loaded into the activation predictor), H the warm-up, H+1+i prompt i."""
    off = None
    if name == "resident":
        model, gens_model = reference, reference
    elif name == "accelerate":
        if device.type != "cuda":
            return {"system": name, "skipped": "needs a CUDA device: on the cpu backend device memory is host memory"}
        model = accelerate_model(model_dir, budget, dtype)
        gens_model = model
    else:
        cfg = dict(OFFLOADED[name])
        if trace is not None and cfg["prefetch"] == "hidden":
            cfg["prefetch"] = "activation"  # a trace is not a function of the hidden state: predict from history
        codec = cfg["codec"]
        size = top_k * tables["slot"] if name == "naive" else budget
        table = tables.get(codec)
        model, off = moeoffload.from_pretrained(model_dir, table=table, gpu_budget=size, device=device, dtype=dtype,
                                                error_bound=bound, codec=codec, cache_policy=cfg["cache_policy"],
                                                prefetch=cfg["prefetch"],
                                                table_dir=None if table else tmp / f"table-{codec}")
        tables.setdefault(codec, str(tmp / f"table-{codec}"))
        gens_model = model
        if trace is not None:  # the recorded history the activation predictor matches against
            for m in activation_matrices(trace[0][: trace[1]], off.table.experts_per_layer):
                off.cache.history.add(m)
    routing = ref_routing = None
    if trace is not None:
        routing = TraceRouting(gens_model, trace[0])
        ref_routing = routing if gens_model is reference else TraceRouting(reference, trace[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_tokens = prefill_s = decode_tokens = decode_s = 0.0
    bytes_decode = accesses = hits = stall = 0.0
    ppl = []
    kw = {}
    if name.endswith("-compiled"):
        torch._dynamo.reset()  # each offload's key is a guard: past 8 systems' graphs dynamo would give up
        gens_model.forward = torch.compile(gens_model.forward)
        # the static cache the compiled graph needs; disable_compile: on cuda, generate() would otherwise
        # compile the model a second time itself, with CUDA graphs ("reduce-overhead")
        kw = dict(cache_implementation="static", disable_compile=True)
    try:
        if routing is not None:
            routing.begin(trace[1])
        if kw:  # compiles for the prompts' shape and the whole decode (a static cache's length), untimed
            generate_timed(gens_model, prompts[0].to(device), new_tokens, off, **kw)
        else:
            generate_timed(gens_model, prompts[0][:, : max(2, prompts[0].shape[1] // 4)].to(device), 2, off)
        for i, prompt in enumerate(prompts):
            if off is not None:
                off.begin_sequence()
            if routing is not None:
                routing.begin(trace[1] + 1 + i)
            gen = generate_timed(gens_model, prompt.to(device), new_tokens, off, **kw)
            prefill_tokens += prompt.shape[1]
            prefill_s += gen.prefill_s
            decode_tokens += max(len(gen.tokens) - 1, 0)
            decode_s += gen.decode_s
            if gen.decode_stats is not None:
                st = gen.decode_stats
                bytes_decode += st["bus_bytes"]
                accesses += st["accesses"]
                hits += st["hits"] + st["inflight_hits"]
                stall += st["stall_s"]
            if ref_routing is not None:
                ref_routing.begin(trace[1] + 1 + i)  # the reference routes the continuation as the system did
            ppl.append(continuation_perplexity(reference, prompt.to(device), gen.tokens))
        stats = off.stats() if off is not None else None
        peak = device_bytes(model) + (stats["peak_used"] if stats is not None else 0)
        if device.type == "cuda":
            # torch's allocator has seen this system's tensors and the reference model (kept for the
            # perplexity of every row); the cache's slots are the runtime's own cudaMalloc of its budget
            others = device_bytes(reference) if model is not reference else 0
            peak = (torch.cuda.max_memory_allocated(device) - others
                    + (stats["budget"] if stats is not None else 0))
        row = {
            "system": name,
            "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else float("nan"),
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else float("nan"),
            "decode_s_per_token": decode_s / decode_tokens if decode_tokens else float("nan"),
            "bus_bytes_per_token": bytes_decode / decode_tokens if off is not None and decode_tokens else 0.0,
            "hit_rate": hits / accesses if accesses else (1.0 if off is None else float("nan")),
            "stall_fraction": stall / decode_s if off is not None and decode_s else 0.0,
            "peak_device_bytes": int(peak),
            "perplexity": sum(ppl) / len(ppl),
        }
        if off is not None:
            row["prefetch"] = off.prefetch or "none"
            row["budget_bytes"] = stats["budget"]
            row["host_pinned"] = stats["host_pinned"]  # else a miss copies from pageable memory
            row["bits_per_weight"] = off.table.bits_per_weight()
        return row
    finally:
        for r in {id(r): r for r in (routing, ref_routing) if r is not None}.values():
            r.remove()
        if off is not None:
            off.close()
        if model is not reference:
            del model


def write_json(out: Path, rows: list, meta: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")


def accelerate_model(model_dir: Path, budget: int, dtype):
    """`accelerate`'s offload as a user sets it up: device_map "auto" with max_memory = the non-expert
    weights + the expert budget on the GPU, the rest in CPU memory (moved to the GPU per forward)."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    experts = sum(p.numel() * p.element_size() for ml in moe_layers(empty)
                  for p in ml.experts.parameters())
    non_expert = sum(p.numel() * p.element_size() for p in empty.parameters()) - experts
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(empty, max_memory={0: non_expert + budget, "cpu": 2**40},
                                       no_split_module_classes=no_split, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map).eval()
    return dispatch_model(model, device_map=device_map) if not hasattr(model, "hf_device_map") else model


def table_md(rows: list[dict], meta: dict) -> str:
    out = [f"# End-to-end decode: {meta['model']} on {meta['device']}", "",
           f"`{meta['command']}`", "",
           f"{meta['prompts']} prompts of {meta['prompt_tokens']} tokens, {meta['new_tokens']} new tokens each "
           "(greedy). Budget: the share of the experts' bf16 bytes given to the device cache.", "",
           "| routing | budget | system | prefill tok/s | decode tok/s | decode ms/token | KiB over the bus/token | hit rate "
           "| stall | peak device MiB | ppl of continuation |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    full = meta.get("full_depth")
    if full:  # a shallower stack than the model: what its decode rate means at the model's depth
        out[6:6] = [f"Decode at {full['layers']} layers (the model's depth; this stack has {full['stack_layers']}): "
                    "the stack's whole decode time per token scaled by "
                    f"{full['layers']}/{full['stack_layers']}, embedding and head included (so an upper bound on "
                    "the time, a lower bound on the rate): "
                    + ", ".join(f"{r['routing']} {r['budget']} {r['system']} {r['decode_tokens_per_s_full_depth']:.1f}"
                                for r in rows if "decode_tokens_per_s_full_depth" in r) + " tok/s.", ""]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['routing']} | {r['budget']} | {r['system']} | skipped: {r['skipped']} |||||||| |")
            continue
        out.append(f"| {r['routing']} | {r['budget']} | {r['system']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} "
                   f"| {r['decode_s_per_token'] * 1e3:.1f} | {r['bus_bytes_per_token'] / 2**10:.0f} "
                   f"| {r['hit_rate']:.3f} | {r['stall_fraction']:.1%} | {r['peak_device_bytes'] / 2**20:.0f} "
                   f"| {r['perplexity']:.3f} |")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out: Path) -> list[str]:
    from moeoffload.errors import MissingExtraError
    from moeoffload.extras import require

    try:
        matplotlib = require("matplotlib", "the plots")
    except MissingExtraError as e:
        print(f"plots skipped: {e}")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for key, label, suffix in (("decode_tokens_per_s", "decode tokens/s", "tokens"),
                               ("bus_bytes_per_token", "bytes over the bus per token", "bytes")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for routing in dict.fromkeys(r["routing"] for r in rows):
            for system in SYSTEMS:
                pts = [(r["budget_share"], r[key]) for r in rows
                       if r["system"] == system and r["routing"] == routing and key in r]
                if pts:
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o" if routing == "model" else "s",
                            linestyle="-" if routing == "model" else "--", label=f"{system} ({routing} routing)")
        ax.set_xlabel("expert budget (% of bf16 expert bytes)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out.with_name(out.name + f"-{suffix}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(str(path))
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="checkpoint directory, or 'default' (the shipped model)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="instead: a stack with this model's MoE shape, random weights of checkpoint-like statistics")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the --shape stack")
    ap.add_argument("--mixtral-layers", type=int, default=0, help="same as --shape mixtral --layers N")
    ap.add_argument("--routing", nargs="+", choices=("model", "trace"), default=["model"],
                    help="model: the routers route; trace: a synthetic trace with real models' locality does "
                         "(moeoffload.sim.synthetic_trace: 6 topics, Zipf(1) popularity, stickiness 0.4), its first "
                         "--trace-history sequences loaded as the recorded activation history")
    ap.add_argument("--trace-history", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where the stack and the tables are written (default: a temp dir)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[10, 25, 50], help="percent of the bf16 experts")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="output path without suffix (default bench/results/e2e-<model>-<dev>)")
    args = ap.parse_args(argv)

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moeoffload.cli import _check_model

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if args.mixtral_layers:
        args.shape, args.layers = "mixtral", args.mixtral_layers
    with tempfile.TemporaryDirectory(prefix="moeoffload-e2e-", dir=args.workdir) as tmpname:
        tmp = Path(tmpname)
        if args.shape:
            start = time.perf_counter()
            model_dir, label = shaped_stack(args.shape, args.layers, tmp / args.shape), f"{args.shape}-{args.layers}l"
            config = AutoConfig.from_pretrained(model_dir)
            print(f"{label}: checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            model_dir, config = _check_model(args.model)
            label = "tiny-moe" if args.model == "default" else Path(args.model).name
        policy = model_dir / "policy.json"
        bound = str(policy) if policy.exists() else 0.3
        prompts = prompts_for(model_dir, config, args.prompts, args.prompt_tokens)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        layers = moe_layers(reference)
        top_k = int(getattr(config, "num_experts_per_tok", 2))
        n_experts = len(layers) * layers[0].experts.down_proj.shape[0]
        start = time.perf_counter()  # the bf16 table (codec none), built once from the checkpoint
        _, off = moeoffload.from_pretrained(model_dir, gpu_budget="1%", device=device, dtype=dtype, codec="none",
                                            table_dir=tmp / "table-none", prefetch=None)
        tables = {"none": str(tmp / "table-none"), "slot": slot_bytes(off.table)}
        off.close()
        print(f"{label}: {len(layers)} MoE layers x {n_experts // len(layers)} experts, bf16 slot "
              f"{tables['slot'] / 2**20:.2f} MiB; bf16 table in {time.perf_counter() - start:.1f} s", flush=True)

        trace = None
        if "trace" in args.routing:  # sequences: the history, one warm-up, one per prompt
            trace = synthetic_trace(args.trace_history + 1 + args.prompts, args.prompt_tokens + args.new_tokens,
                                    len(layers), n_experts // len(layers), top_k, seed=0)

        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"e2e-{label}-{device.type}"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": label, "device": device_name(device), "command": "python " + " ".join(["bench/e2e.py", *(argv or sys.argv[1:])]),
                "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "routing": args.routing, "trace": {"generator": "moeoffload.sim.synthetic_trace", "seed": 0,
                                                   "history_sequences": args.trace_history} if trace is not None else None,
                "weights": WEIGHT_STATS if args.shape else "checkpoint",
                "torch": torch.__version__, "backend_info": moeoffload.backend_info()}
        scale = 1.0
        if args.shape and args.layers < FULL_LAYERS[args.shape]:
            scale = FULL_LAYERS[args.shape] / args.layers
            meta["full_depth"] = {"layers": FULL_LAYERS[args.shape], "stack_layers": args.layers}

        rows = []
        for routing in args.routing:
            for share in args.budgets:
                budget = max(1, round(share / 100 * n_experts)) * tables["slot"]
                for system in args.systems:
                    if system in ("resident", "naive") and share != args.budgets[0]:
                        continue  # budget-independent: measured once
                    t0 = time.perf_counter()
                    row = run_system(system, model_dir, prompts, args.new_tokens, budget, tables, device, dtype,
                                     reference, bound, top_k, tmp,
                                     (trace, args.trace_history) if routing == "trace" else None)
                    row.update(routing=routing, budget=f"{share:g}%", budget_share=share / 100)
                    if "full_depth" in meta and "decode_s_per_token" in row:
                        row["decode_tokens_per_s_full_depth"] = 1.0 / (row["decode_s_per_token"] * scale)
                    rows.append(row)
                    write_json(out, rows, meta)  # after every row: a run cut short keeps what it measured
                    shown = "skipped" if "skipped" in row else f"decode {row['decode_tokens_per_s']:.2f} tok/s"
                    print(f"  {routing} {share:g}% {system:22s} {shown} ({time.perf_counter() - t0:.1f} s)", flush=True)

    write_json(out, rows, meta)
    md = table_md(rows, meta)
    out.with_suffix(".md").write_text(md)
    print(md)
    for p in plots(rows, out):
        print("plot:", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
