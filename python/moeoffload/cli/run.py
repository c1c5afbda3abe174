"""`moeoffload run`: generate with a model's experts compressed, cached within a budget, prefetched.

    moeoffload run --model default --prompt "def parse_args(" --gpu-budget 25% --max-new-tokens 64
    moeoffload run --model path/to/checkpoint --table experts.table --gpu-budget 6GiB --compare

The model is loaded with moeoffload.from_pretrained: its non-expert weights
only, the experts served from the table (built from the checkpoint when no
--table is given). Streams the continuation, then prints prefill and decode
speed separately, the cache's hit rate, bytes over the bus per token, the stall
time and bits per weight; ``--compare`` also runs the model with its dense
experts (greedy, same prompt) and says where the tokens part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    tokens: list[int]           # the new tokens only
    prefill_s: float            # the forward of the prompt (and the first new token)
    decode_s: float             # every later token
    stats: dict | None          # the offload's counters over the run (None for the dense model)
    decode_stats: dict | None = None  # the same over the decode steps only

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def generate_timed(model, input_ids, max_new_tokens: int, off=None, streamer=None, **generate_kw) -> Generation:
    """Greedy generate, timing the prefill (up to the first new token) and the decode steps apart;
    generate_kw go to generate (cache_implementation="static" for a compiled model)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []
    at_first: list[dict] = []

    class _Clock(LogitsProcessor):
        def __call__(self, ids, scores):
            if not stamps and scores.is_cuda:
                torch.cuda.synchronize(scores.device)  # the prefill's kernels have run, not just been queued
            stamps.append(time.perf_counter())
            if off is not None and not at_first:
                at_first.append(dict(off.stats()))
            return scores

    before = dict(off.stats()) if off is not None else None
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([_Clock()]), streamer=streamer,
                             pad_token_id=getattr(model.config, "pad_token_id", None), **generate_kw)
    end = time.perf_counter()
    stats = decode_stats = None
    if off is not None:
        after = off.stats()
        stats = _difference(after, before)
        decode_stats = _difference(after, at_first[0] if at_first else after)
    first = stamps[0] if stamps else end
    return Generation(out[0, input_ids.shape[1]:].tolist(), first - start, end - first, stats, decode_stats)


def _difference(after: dict, before: dict) -> dict:
    """The counters of `after` less those of `before`; sizes and settings as they are."""
    keep = ("budget", "used_bytes", "peak_used", "bits_per_weight", "expert_bytes_freed", "fused_layers")
    return {k: (v - before[k] if isinstance(v, (int, float)) and not isinstance(v, bool) and k in before
                and k not in keep else v) for k, v in after.items()}


def add_parser(sub) -> None:
    from . import _positive_int

    p = sub.add_parser("run", help="generate with the model's experts offloaded (compressed, cached, prefetched)")
    p.add_argument("--model", default="default", help="a Hugging Face MoE checkpoint directory, or 'default'")
    p.add_argument("--prompt", default=None, help="text to continue (default: the start of the model's held-out text)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--gpu-budget", "--budget", dest="budget", default="25%",
                   help="device memory for experts: a size ('6GiB') or a share of the experts ('25%%')")
    p.add_argument("--table", default=None, help="a table built by `moeoffload compress` (default: build one now)")
    p.add_argument("--codec", choices=("szp", "szpe", "none"), default=None,
                   help="the experts' coding when the table is built now (default szp)")
    p.add_argument("--error-bound", default=None,
                   help="x mean|w| per matrix, or a policy JSON (default: the model's policy.json, else 0.3)")
    p.add_argument("--cache-policy", choices=("activation", "lru", "lfu"), default="activation")
    p.add_argument("--prefetch", choices=("hidden", "activation", "combined", "none"), default="hidden")
    p.add_argument("--compare", action="store_true", help="also generate with the dense experts and compare")
    p.set_defaults(fn=cmd)


def _error_bound(args, model_dir: Path):
    from . import UsageError, _alpha

    if args.error_bound is None:
        policy = model_dir / "policy.json"
        return str(policy) if policy.exists() else 0.3
    if Path(args.error_bound).is_file():
        from moeoffload.policy import BoundPolicy

        BoundPolicy.from_any(args.error_bound)  # a malformed policy is named before the model loads
        return args.error_bound
    try:
        return _alpha(args.error_bound)
    except Exception:  # noqa: BLE001 - argparse's type error, one line
        raise UsageError(f"--error-bound {args.error_bound!r}: give a positive number (x mean|w|) or a policy "
                         "JSON file") from None


def cmd(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import moeoffload
    from moeoffload import evaluation, sensitivity

    from . import UsageError, _check_model, _path_arg

    from moeoffload.errors import BudgetError
    from moeoffload.integrations.hf import parse_budget_spec

    try:
        parse_budget_spec(args.budget)
    except BudgetError as e:
        raise UsageError(f"--budget {args.budget}: {e}") from None
    if args.table is not None:
        _path_arg(args.table, "--table")
        given = [flag for flag, v in (("--codec", args.codec), ("--error-bound", args.error_bound)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} with --table: the table holds its own coding and bounds "
                             "(give one or the other)")
    model_dir, config = _check_model(args.model)
    bound = _error_bound(args, model_dir)
    if args.prompt is not None:
        text = args.prompt.encode("utf-8", "surrogateescape")  # bytes that are no UTF-8 reach argv escaped
    else:
        text = sensitivity.load_text(None, model_dir)[:200] if (model_dir / "heldout.txt").exists() else b"The"
    ids = evaluation.encode(model_dir, None, text)
    bos = getattr(config, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        raise UsageError("--prompt: the prompt gives no tokens")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and len(ids) + args.max_new_tokens > limit:
        raise UsageError(f"--prompt and --max-new-tokens: {len(ids)} prompt tokens + {args.max_new_tokens} new "
                         f"exceed the model's context of {limit} positions; shorten the prompt or generate fewer")
    input_ids = torch.tensor([ids])

    if args.table is not None and not Path(args.table, "manifest.json").is_file():
        raise UsageError(f"--table {args.table}: not a moeoffload table (no manifest.json); make one with "
                         "`moeoffload compress`")

    dense = None
    if args.compare:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        dense = generate_timed(reference, input_ids, args.max_new_tokens)
        del reference
    prefetch = None if args.prefetch == "none" else args.prefetch
    model, off = moeoffload.from_pretrained(model_dir, table=args.table, gpu_budget=args.budget, error_bound=bound,
                                            codec=args.codec or "szp", cache_policy=args.cache_policy, prefetch=prefetch)
    with off:
        print("continuation: ", end="", flush=True)
        gen = generate_timed(model, input_ids, args.max_new_tokens, off, streamer=_Streamer(model_dir))
        print(report(gen, off, dense))
    return 0


class _Streamer:
    """Prints the new tokens as generate() makes them (the model's tokenizer, or bytes for the tiny model)."""

    def __init__(self, model_dir: Path):
        self.tokenizer = None
        if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1))
        text = self.text()
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)

    def text(self) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(self.tokens)
        return bytes(t for t in self.tokens if t < 256).decode("utf-8", "replace")

    def end(self) -> None:
        print(flush=True)


def report(gen: Generation, off, dense: Generation | None) -> str:
    st = gen.stats
    n = max(len(gen.tokens), 1)
    lines = [f"experts: {off.codec}, {off.table.bits_per_weight():.2f} bits/weight, budget {st['budget'] / 2**20:.2f} "
             f"MiB of {off.table.expert_bytes().sum() / 2**20:.2f} MiB, {st['fused_layers']} of "
             f"{len(off.layers)} MoE layers fused, prefetch {off.prefetch or 'off'}; dense experts "
             + (f"freed: {st['expert_bytes_freed'] / 2**20:.2f} MiB" if st["expert_bytes_freed"] else "never loaded"),
             f"prefill {gen.prefill_s * 1e3:.1f} ms; decode {gen.decode_tokens_per_s:.1f} tokens/s "
             f"({len(gen.tokens)} tokens)",
             f"cache: hit rate {st['hits'] / max(st['accesses'], 1):.3f} ({st['misses']} misses, {st['prefetches']} "
             f"prefetches, {st['prefetch_hits']} used), {st['bus_bytes'] / n / 2**10:.1f} KiB over the bus per "
             f"token, {st['stall_s'] * 1e3:.1f} ms stalled on copies"]
    if dense is not None:
        same = next((i for i, (a, b) in enumerate(zip(gen.tokens, dense.tokens)) if a != b), None)
        lines.append(f"dense experts: decode {dense.decode_tokens_per_s:.1f} tokens/s; tokens "
                     + ("identical" if same is None else f"part at token {same}"))
    return "\n".join(lines)
