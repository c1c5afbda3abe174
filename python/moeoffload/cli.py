"""`moeoffload` command line: demo, info, sensitivity, policy."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import moeoffload

    print(json.dumps(moeoffload.backend_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    """The main job on the shipped tiny MoE: compress its experts, load them pinned, serve them through
    the cache on the model's own routing, and measure what compression cost in perplexity."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    import moeoffload
    from moeoffload import codec_eval, sensitivity, sim, table
    from moeoffload.models import tiny_moe
    from moeoffload.policy import BoundPolicy
    from moeoffload.prefetch import PrefetchConfig, mixtral_hidden_predictions

    info = moeoffload.backend_info()
    print(f"moeoffload {moeoffload.__version__}: backend {info['backend']} "
          f"(CUDA kernels {'built' if info['built_with_cuda'] else 'not built'}; "
          f"{info['device_name'] or info['reason']}), {info['num_threads']} CPU threads")
    model = tiny_moe.load()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Model: shipped tiny MoE ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts top-"
          f"{cfg.num_experts_per_tok}, {n_params / 1e6:.2f} M parameters, bf16 checkpoint) at {tiny_moe.DEFAULT_DIR}")

    policy_file = tiny_moe.DEFAULT_DIR / "policy.json"
    policy = BoundPolicy.from_any(policy_file) if policy_file.exists() and not args.alpha else \
        BoundPolicy.from_any(args.alpha or 0.3, "meanabs")
    where = f"per-layer policy {policy_file.name}" if policy.default is None else f"uniform {policy.default:g} x mean|w|"
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    print(f"\n1. Compress every expert matrix with szp, bounds from the {where}:")
    built = table.build(bf16, policy, progress=False, model_id="tiny-moe")
    with tempfile.TemporaryDirectory() as tmp:
        built.save(Path(tmp) / "tiny-moe.table")
        loaded = table.load(Path(tmp) / "tiny-moe.table", backend="cpu", expect=bf16)
        print(f"   {loaded.bits_per_weight():.3f} bits/weight ({16 / loaded.bits_per_weight():.2f}x smaller than bf16); "
              f"table mapped {'and pinned in place' if loaded.store.pinned else '(the backend could not pin it)'}: "
              f"{loaded.store.mapped_bytes / 2**20:.2f} MiB, CRC32 of every payload checked")

        print("\n2. Perplexity on held-out stdlib source, experts decompressed from the table:")
        text_all = tiny_moe.default_heldout()
        text = text_all[: args.max_bytes]
        batches = tiny_moe.windows(text, 256)
        base = sensitivity.evaluate(model, batches)
        grid = sensitivity.ExpertGrid(model)
        every_expert = [(l, e) for l in range(grid.num_layers) for e in range(grid.experts_per_layer)]
        with sensitivity.replaced(grid, every_expert,
                                  lambda l, e, ref, w: loaded.decompress(l, e, ref.name, dtype=w.dtype)):
            comp = sensitivity.evaluate(model, batches)
        print(f"   original {base['ppl']:.4f} (accuracy {100 * base['acc']:.2f}%), compressed experts {comp['ppl']:.4f} "
              f"({100 * (comp['ppl'] / base['ppl'] - 1):+.2f}%, accuracy {100 * comp['acc']:.2f}%)")

        print("\n3. The device cache on the model's own routing (held-out traces; 25% of the experts fit):")
        trace = np.load(tiny_moe.DEFAULT_DIR / "routing-heldout.npy")[: args.sequences]
        half = trace.shape[0] // 2
        E = cfg.num_local_experts
        size = int(loaded.expert_bytes().max())
        budget = int(round(0.25 * grid.num_layers * E)) * (-(-size // 256) * 256)

        hidden = mixtral_hidden_predictions(model, tiny_moe.windows(text_all, 256)[: trace.shape[0]])[half:]
        pf = PrefetchConfig(depth=3, per_layer=4, min_probability=0.02, recency=0.5)  # bench/cache_policies.py's
        rows = [sim.replay(trace[half:], size, budget, p, f, history=sim.history_from_trace(trace[:half], E),
                           hidden_predictions=hidden)
                for p, f in (("lru", None), ("lfu", None), ("activation", None), ("activation", pf),
                             ("activation", PrefetchConfig(**{**pf.__dict__, "source": "hidden"})))]
        bel = sim.belady(trace[half:], size, budget)
        print(f"   {'policy':34s} {'hit rate':>8s} {'demand misses':>13s}")
        for r in rows:
            name = r.policy + ("" if r.prefetch == "none" else f" + {r.prefetch}-state prefetch" if r.prefetch == "hidden"
                               else f" + {r.prefetch} prefetch")
            print(f"   {name:34s} {r.hit_rate:8.3f} {r.demand_misses:13d}")
        print(f"   {'belady (optimal demand cache)':34s} {bel['hit_rate']:8.3f} {bel['demand_misses']:13d}")
        loaded.close()

    print("\n4. szp next to SZ3 on the same experts (bound 0.3 x mean|w|, every weight checked):")
    mats = {f"L{l}E{e}.{r.name}": grid.view(r).detach().clone()
            for l in range(grid.num_layers) for e in range(2) for r in grid.matrices(l, e)}
    scale = float(np.mean([float(m.abs().mean() / m.std()) for m in mats.values()]))
    results = [codec_eval.evaluate(mats, 0.3 * scale, c, repeats=args.repeats) for c in ("szp", "sz3")]
    print(codec_eval.format_table(results))
    bad = [r.codec for r in results if r.max_err_over_eb > 1.0]
    if bad:
        print(f"\nBOUND VIOLATED by {bad}", file=sys.stderr)
        return 1
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _percent(text: str) -> float:
    try:
        return float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 1% or 0.5, got {text!r}") from None


def _cmd_sensitivity(args) -> int:
    from moeoffload import sensitivity

    study = sensitivity.Study(
        model_path=args.model, perturb=args.perturb, alphas=args.alpha, eb_mode=args.eb_mode, scopes=args.scope,
        data=args.data, max_bytes=args.max_bytes, seq=args.seq, seed=args.seed,
        tasks=[t for t in args.tasks.split(",") if t] if args.tasks else [], task_limit=args.task_limit)
    try:
        sensitivity.check_args(study.perturb, study.alphas, study.eb_mode, study.scopes)
    except ValueError as e:
        print(f"moeoffload sensitivity: {e}", file=sys.stderr)
        return 2
    doc = sensitivity.run(study, args.out, progress=not args.quiet)
    plots = [] if args.no_plots else sensitivity.plot(doc, args.out)
    base = doc["baseline"]
    print(f"baseline: ppl {base['ppl']:.4f}, next-token accuracy {100 * base['acc']:.2f}% over {base['tokens']} tokens")
    print(f"{'scope':7s} {'target':9s} {'alpha':>6s} {'dppl %':>8s} {'dacc pts':>9s} {'bits/w':>7s}")
    for c in doc["cells"]:
        bits = f"{c['bits_per_weight']:.3f}" if c["bits_per_weight"] is not None else "-"
        print(f"{c['scope']:7s} {c['target']:9s} {c['alpha']:6g} {c['dppl_pct']:+8.3f} {c['dacc_pts']:+9.3f} {bits:>7s}")
    print(f"wrote {args.out}/results.json, results.csv" + (f" and {len(plots)} plots" if plots else ""))
    return 0


def _cmd_policy(args) -> int:
    from moeoffload import sensitivity

    try:
        doc = json.loads(open(args.from_file).read())
    except (OSError, ValueError) as e:
        print(f"moeoffload policy: cannot read {args.from_file}: {e}", file=sys.stderr)
        return 2
    try:
        pol = sensitivity.policy_from_study(doc, args.max_dppl, progress=not args.quiet)
    except ValueError as e:
        print(f"moeoffload policy: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        json.dump(pol, f, indent=1)
        f.write("\n")
    p, u = pol["policy"], pol["uniform"]
    print(f"per-layer policy: {p['bits_per_weight']:.3f} bits/w, measured Δppl {p['dppl_pct']:+.3f}% "
          f"(budget {args.max_dppl}%): bounds {pol['bounds']}")
    if u:
        print(f"best uniform:     {u['bits_per_weight']:.3f} bits/w, measured Δppl {u['dppl_pct']:+.3f}% (alpha {u['alpha']:g})")
    else:
        print("best uniform:     none of the study's bounds meets the budget")
    print(f"wrote {args.out}")
    return 0 if pol["meets_budget"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compress the shipped tiny MoE's experts, serve them through the cache, measure")
    p.add_argument("--alpha", type=float, default=None,
                   help="uniform bound (x mean|w|) instead of the shipped per-layer policy")
    p.add_argument("--max-bytes", type=int, default=16384, help="held-out text to evaluate on")
    p.add_argument("--sequences", type=int, default=64, help="routing-trace sequences to replay (half are history)")
    p.add_argument("--repeats", type=int, default=3, help="decode timings: best of this many runs")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("info", help="print what the build holds and what the machine offers")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("sensitivity", help="perturb experts (noise or a real codec), evaluate, restore")
    p.add_argument("--model", default="default", help="checkpoint directory, or 'default' (the shipped tiny MoE)")
    p.add_argument("--perturb", default="szp", help="gaussian | sz3 | szp")
    p.add_argument("--alpha", type=_floats, default=[0.1, 0.3, 0.5, 0.8],
                   help="bounds (noise std) as multiples of the unit of --eb-mode, comma-separated")
    p.add_argument("--eb-mode", default="meanabs", help="meanabs (x mean|w|, the paper's) | abs | rel (x range)")
    p.add_argument("--scope", type=lambda s: [x for x in s.split(",") if x], default=["layer"],
                   help="expert | layer | group | all, comma-separated")
    p.add_argument("--data", default="default", help="held-out text file, or 'default' (the model's held-out sample)")
    p.add_argument("--max-bytes", type=int, default=32768, help="evaluate on this much of the text")
    p.add_argument("--seq", type=int, default=256, help="evaluation window in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="", help="lm-eval task names, comma-separated (needs lm-eval installed)")
    p.add_argument("--task-limit", type=int, default=None)
    p.add_argument("--out", default="sensitivity", help="output directory (a rerun resumes it)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_sensitivity)
    p = sub.add_parser("policy", help="per-layer bounds within an accuracy budget, from a sensitivity study")
    p.add_argument("--from", dest="from_file", required=True, help="results.json of `moeoffload sensitivity`")
    p.add_argument("--max-dppl", type=_percent, required=True, help="allowed perplexity increase, e.g. 1%%")
    p.add_argument("--out", default="policy.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_policy)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
