"""`moeoffload` command line: demo, run, info, sensitivity, policy (one module per command as they move out)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A mistake in the command line or in what it names, found before any work starts."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


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
    from moeoffload import codec_eval, evaluation, sensitivity, sim, table
    from moeoffload.models import tiny_moe
    from moeoffload.policy import BoundPolicy
    from moeoffload.prefetch import PrefetchConfig, hidden_predictions

    from moeoffload.cache import slot_bytes

    from .run import generate_timed

    heldout = tiny_moe.default_heldout()
    if len(heldout[: args.max_bytes]) < 255:
        raise UsageError(f"--max-bytes {args.max_bytes}: the demo evaluates windows of 256 tokens (bytes) and needs "
                         "at least 255 bytes of text")
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
        loaded = table.load(Path(tmp) / "tiny-moe.table", expect=bf16)
        print(f"   {loaded.bits_per_weight():.3f} bits/weight ({16 / loaded.bits_per_weight():.2f}x smaller than bf16); "
              f"table saved and loaded: {int(loaded.expert_bytes().sum()) / 2**20:.2f} MiB, CRC32 of every payload checked")

        print("\n2. Perplexity on held-out stdlib source, experts decompressed from the table:")
        text_all = tiny_moe.default_heldout()
        text = text_all[: args.max_bytes]
        batches = tiny_moe.windows(text, 256)
        base = evaluation.evaluate(model, batches)
        grid = sensitivity.ExpertGrid(model)
        every_expert = [(l, e) for l in range(grid.num_layers) for e in range(grid.experts_per_layer)]
        with sensitivity.replaced(grid, every_expert,
                                  lambda l, e, ref, w: loaded.decompress(l, e, ref.name, dtype=w.dtype)):
            comp = evaluation.evaluate(model, batches)
        print(f"   original {base['ppl']:.4f} (accuracy {100 * base['acc']:.2f}%), compressed experts {comp['ppl']:.4f} "
              f"({100 * (comp['ppl'] / base['ppl'] - 1):+.2f}%, accuracy {100 * comp['acc']:.2f}%)")

        print("\n3. The device cache on the model's own routing (held-out traces; 25% of the experts fit):")
        trace = np.load(tiny_moe.DEFAULT_DIR / "routing-heldout.npy")[: args.sequences]
        half = trace.shape[0] // 2
        E = cfg.num_local_experts
        size = int(loaded.expert_bytes().max())
        budget = int(round(0.25 * grid.num_layers * E)) * slot_bytes(loaded)

        hidden = hidden_predictions(model, tiny_moe.windows(text_all, 256)[: trace.shape[0]])[half:]
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

        print("\n4. Generate through the offload path (moeoffload.offload: experts served from the table above at a "
              "25% budget,\n   fused kernels, hidden-state prefetch), beside the raw bf16 experts (codec none) and "
              "the dense model:")
        prompt = torch.tensor([[tiny_moe.BOS, *text_all[:120]]])
        dense = generate_timed(tiny_moe.load(dtype=torch.bfloat16), prompt, args.new_tokens)
        runs = {}
        for name, kw in (("szp", {"table": loaded}), ("none", {"codec": "none"})):
            m = tiny_moe.load(dtype=torch.bfloat16)
            with moeoffload.offload(m, gpu_budget="25%", **kw) as off:
                runs[name] = (generate_timed(m, prompt, args.new_tokens, off), off.stats())
        print(f"   prompt: ...{bytes(text_all[90:120]).decode('utf-8', 'replace')!r}")
        print(f"   {'experts':18s} {'decode tok/s':>12s} {'hit rate':>8s} {'KiB/token':>9s}  tokens vs dense  continuation")
        for name, (gen, st) in (("dense bf16", (dense, None)), *[(f"offload {k}", v) for k, v in runs.items()]):
            part = next((i for i, (a, b) in enumerate(zip(gen.tokens, dense.tokens)) if a != b), None)
            same = "identical" if part is None else f"part at {part}"
            hit = "" if st is None else f"{gen.stats['hits'] / max(gen.stats['accesses'], 1):.3f}"
            kib = "" if st is None else f"{gen.stats['bus_bytes'] / len(gen.tokens) / 2**10:.1f}"
            text = bytes(t for t in gen.tokens if t < 256).decode("utf-8", "replace")
            print(f"   {name:18s} {gen.decode_tokens_per_s:12.1f} {hit:>8s} {kib:>9s}  {same:15s}  {text[:40]!r}")
        if runs["none"][0].tokens != dense.tokens:
            print("\nOFFLOAD WITH RAW EXPERTS DIFFERS FROM THE DENSE MODEL", file=sys.stderr)
            return 1
        loaded.close()

    print("\n5. szp next to SZ3 on the same experts (bound 0.3 x mean|w|, every weight checked):")
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


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi) (no upper limit when hi is None), else a one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value >= hi):
            want = "a positive integer" if (lo, hi) == (1, None) else f"an integer in [{lo}, {hi})"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    return parse


_positive_int = _int_in(1)
_seed = _int_in(0, 2**63)


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"alpha must be a positive finite number, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    values = [_alpha(x.strip()) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _choice_list(kind: str, choices):
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}s ({', '.join(choices)}), got {text!r}")
        for v in values:
            if v not in choices:
                raise argparse.ArgumentTypeError(f"unknown {kind} {v!r} (expected one of {', '.join(choices)})")
        return values
    return parse


def _choice(kind: str, choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r} (expected one of {', '.join(choices)})")
        return text
    return parse


def _percent(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 1% or 0.5, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive percentage like 1% or 0.5, got {text!r}")
    return value


# ---- checks of what the command line names, before any work starts ----

def _path_arg(value, flag: str) -> Path:
    """A path the command line names; an empty one (an unset $VAR) would be the current directory."""
    if not str(value).strip():
        raise UsageError(f"{flag}: empty; give a path")
    return Path(value)


def _writable_dir(out, flag: str = "--out") -> Path:
    """`out` is (or can be made) a directory this process can write."""
    import tempfile

    p = _path_arg(out, flag)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return p


def _number(v) -> bool:
    """A finite int or float (not a bool, not a string), as a study's results.json holds them."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_out_dir(out: str) -> None:
    """--out is (or can be made) a directory this process can write; a results.json in it is a study's."""
    p = _writable_dir(out)
    results = p / "results.json"
    if results.exists():
        try:
            doc = json.loads(results.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"--out {out}: its results.json cannot be read to resume ({e}); "
                             "move it away or choose another --out") from None
        cells = doc.get("cells", []) if isinstance(doc, dict) else None
        if not (isinstance(cells, list) and all(isinstance(c, dict) and isinstance(c.get("key"), str) for c in cells)
                and isinstance(doc.get("baseline") or {}, dict)):
            raise UsageError(f"--out {out}: its results.json is not a sensitivity study's; "
                             "move it away or choose another --out")
        base = doc.get("baseline")  # reused as it is: the cells' deltas and the summary are computed from it
        if base is not None and not (isinstance(base, dict) and _number(base.get("ppl")) and base["ppl"] > 0
                                     and _number(base.get("acc")) and _integer(base.get("tokens"), 1)):
            raise UsageError(f"--out {out}: its results.json's baseline lacks ppl, acc or tokens, or one is not a "
                             "finite number; move it away or choose another --out")


def _check_out_file(out: str) -> None:
    """--out is a file this process can create or replace."""
    import tempfile

    p = _path_arg(out, "--out")
    if p.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name")
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: the directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
        if p.exists():
            with open(p, "r+b"):
                pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _check_model(spec, flag: str = "--model"):
    """`spec` ('default' or a checkpoint directory) is a causal LM with MoE layers; (model_dir, config).

    Builds the model on the meta device (no weights, no memory) to find its experts as the study will."""
    import torch

    from moeoffload.errors import NoMoeLayersError
    from moeoffload.models import tiny_moe
    from moeoffload.sensitivity import ExpertGrid

    if spec in (None, "default"):
        model_dir = tiny_moe.DEFAULT_DIR
    else:
        model_dir = Path(spec)
        if not model_dir.exists():
            raise UsageError(f"{flag} {spec}: no such directory (give a Hugging Face checkpoint directory or 'default')")
        if not model_dir.is_dir():
            raise UsageError(f"{flag} {spec}: not a directory (give a Hugging Face checkpoint directory or 'default')")
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"{flag} {spec}: not a model checkpoint (no config.json)")
        if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
            raise UsageError(f"{flag} {spec}: the checkpoint has no weights (no .safetensors or .bin files)")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever transformers finds wrong with it
        raise UsageError(f"{flag} {spec}: not a causal language model transformers can load "
                         f"({type(e).__name__}: {e})") from None
    try:
        ExpertGrid(skeleton)
    except NoMoeLayersError as e:
        raise UsageError(f"{flag} {spec}: {e}; the study needs a Mixture-of-Experts model") from None
    return model_dir, config


def _check_text(data, max_bytes: int, seq: int, model_dir: Path, config, flag: str = "--data") -> None:
    """The evaluation text exists and gives at least one window of `seq` tokens."""
    from moeoffload import evaluation, sensitivity

    if data not in (None, "default"):
        p = Path(data)
        if not p.exists():
            raise UsageError(f"{flag} {data}: no such file")
        if not p.is_file():
            raise UsageError(f"{flag} {data}: not a file")
        try:
            open(p, "rb").close()
        except OSError as e:
            raise UsageError(f"{flag} {data}: cannot read it ({e.strerror or e})") from None
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq > limit:
        raise UsageError(f"--seq {seq}: the model takes at most {limit} positions")
    text = sensitivity.load_text(data, model_dir)[:max_bytes]
    try:
        ids = evaluation.encode(model_dir, None, text)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer in the checkpoint
        raise UsageError(f"--model {model_dir}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    bos = getattr(config, "bos_token_id", None)
    if seq - (bos is not None) < 1:
        raise UsageError(f"--seq {seq}: a window starts with the BOS token and needs at least one more: 2 or more")
    try:
        evaluation.windows(ids, seq, bos)
    except ValueError:
        source = "the model's held-out sample" if data in (None, "default") else data
        raise UsageError(f"--seq {seq} needs at least {seq - (bos is not None)} tokens of evaluation text; "
                         f"{source} cut to --max-bytes {max_bytes} gives {len(ids)}: "
                         "lower --seq or give more text") from None


def _check_tasks(tasks) -> None:
    import importlib.util

    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-evaluation-harness, which is not installed (pip install lm-eval)")


def _check_plots(no_plots: bool) -> None:
    from moeoffload.errors import MissingExtraError
    from moeoffload.extras import require

    if not no_plots:
        try:
            require("matplotlib", "the plots")
        except MissingExtraError as e:
            raise UsageError(f"{e} (or pass --no-plots)") from None


def _cmd_sensitivity(args) -> int:
    from moeoffload import sensitivity

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    # Everything the study will need, checked before the first evaluation (so no result is lost at the end).
    _check_tasks(tasks)
    _check_plots(args.no_plots)
    model_dir, config = _check_model(args.model)
    _check_text(args.data, args.max_bytes, args.seq, model_dir, config)
    _check_out_dir(args.out)
    study = sensitivity.Study(
        model_path=args.model, perturb=args.perturb, alphas=args.alpha, eb_mode=args.eb_mode, scopes=args.scope,
        data=args.data, max_bytes=args.max_bytes, seq=args.seq, seed=args.seed,
        tasks=tasks, task_limit=args.task_limit)
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


def _check_study_doc(doc, name: str) -> None:
    """The fields of a study's results.json that `moeoffload policy` uses are there, of their types."""
    from moeoffload.sensitivity import EB_MODES, PERTURBATIONS

    def bad(what: str) -> UsageError:
        return UsageError(f"--from {name}: not the results.json of `moeoffload sensitivity` ({what})")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    st = doc.get("study")
    if not isinstance(st, dict):
        raise bad("no 'study' object")
    for key in ("model_path", "data"):
        if not isinstance(st.get(key), str):
            raise bad(f"study.{key} is missing or not a string")
    if st.get("perturb") not in PERTURBATIONS or st.get("eb_mode") not in EB_MODES:
        raise bad("study.perturb or study.eb_mode is missing or unknown")
    for key, lo in (("max_bytes", 1), ("seq", 2), ("seed", 0)):
        if not _integer(st.get(key), lo):
            raise bad(f"study.{key} is missing or not an integer >= {lo}")
    model = doc.get("model")
    if not (isinstance(model, dict) and _integer(model.get("moe_layers"), 1)):
        raise bad("model.moe_layers is missing or not a positive integer")
    base = doc.get("baseline")
    if not (isinstance(base, dict) and _number(base.get("ppl")) and base["ppl"] > 0):
        raise bad("baseline.ppl is missing or not a positive number")
    cells = doc.get("cells")
    if not isinstance(cells, list):
        raise bad("no 'cells' list")
    for i, c in enumerate(cells):
        if not (isinstance(c, dict) and isinstance(c.get("scope"), str) and _number(c.get("alpha")) and c["alpha"] > 0
                and _number(c.get("dppl_pct")) and (c.get("bits_per_weight") is None or _number(c["bits_per_weight"]))
                and isinstance(c.get("layers"), list) and all(_integer(l, 0) for l in c["layers"])):
            raise bad(f"cells[{i}] lacks scope, alpha, dppl_pct, bits_per_weight or layers")


def _moe_layers(config) -> int:
    """How many MoE layers a model of `config` has (built on the meta device: no weights, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moeoffload.sensitivity import ExpertGrid

    with torch.device("meta"):
        return ExpertGrid(AutoModelForCausalLM.from_config(config)).num_layers


def _cmd_policy(args) -> int:
    from moeoffload import sensitivity

    try:
        doc = json.loads(open(args.from_file).read())
    except (OSError, ValueError, RecursionError) as e:
        print(f"moeoffload policy: cannot read {args.from_file}: {_one_line(e)}", file=sys.stderr)
        return 2
    # Before the measurements: the study's model and text still load, and --out can be written.
    if os.path.exists(args.out) and os.path.samefile(args.out, args.from_file):  # (also through a link)
        raise UsageError(f"--out {args.out}: is the study --from {args.from_file} itself; writing the policy there "
                         "would overwrite the study: choose another --out")
    _check_study_doc(doc, args.from_file)
    st = doc["study"]
    model_dir, config = _check_model(st["model_path"], flag="the study's model")
    layers = _moe_layers(config)
    if layers != doc["model"]["moe_layers"]:
        raise UsageError(f"--from {args.from_file}: model.moe_layers says {doc['model']['moe_layers']}, but the "
                         f"study's model {st['model_path']} has {layers} MoE layers")
    _check_text(st["data"], st["max_bytes"], st["seq"], model_dir, config, flag="the study's data")
    _check_out_file(args.out)
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


def _stdout_closed() -> bool:
    """Whether stdout's reader went away: a flush fails (buffered), or a pipe with no reader left reports
    POLLERR (unbuffered, PYTHONUNBUFFERED=1: nothing is left to flush)."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        return True
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # (no poll, no file descriptor)
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user's mistake ends in one line on stderr and exit status 2, never a traceback."""
    from moeoffload.errors import MoeoffloadError
    from moeoffload.sensitivity import EB_MODES, PERTURBATIONS, SCOPES

    parser = _Parser(prog="moeoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compress the shipped tiny MoE's experts, serve them through the cache, measure")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="uniform bound (x mean|w|) instead of the shipped per-layer policy")
    p.add_argument("--max-bytes", type=_positive_int, default=16384, help="held-out text to evaluate on")
    p.add_argument("--sequences", type=_positive_int, default=64,
                   help="routing-trace sequences to replay (half are history)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="decode timings: best of this many runs")
    p.add_argument("--new-tokens", type=_positive_int, default=48, help="tokens to generate through the offload path")
    p.set_defaults(fn=_cmd_demo)
    from . import compress, run

    run.add_parser(sub)
    compress.add_parser(sub)
    p = sub.add_parser("info", help="print what the build holds and what the machine offers")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("sensitivity", help="perturb experts (noise or a real codec), evaluate, restore")
    p.add_argument("--model", default="default", help="checkpoint directory, or 'default' (the shipped tiny MoE)")
    p.add_argument("--perturb", type=_choice("perturbation", PERTURBATIONS), default="szp", help="gaussian | sz3 | szp | szpe (szp's values, entropy-coded bits)")
    p.add_argument("--alpha", type=_floats, default=[0.1, 0.3, 0.5, 0.8],
                   help="bounds (noise std) as multiples of the unit of --eb-mode, comma-separated")
    p.add_argument("--eb-mode", type=_choice("eb-mode", EB_MODES), default="meanabs",
                   help="meanabs (x mean|w|, the paper's) | abs | rel (x range)")
    p.add_argument("--scope", type=_choice_list("scope", SCOPES), default=["layer"],
                   help="expert | layer | group | all, comma-separated")
    p.add_argument("--data", default="default", help="held-out text file, or 'default' (the model's held-out sample)")
    p.add_argument("--max-bytes", type=_positive_int, default=32768, help="evaluate on this much of the text")
    p.add_argument("--seq", type=_positive_int, default=256, help="evaluation window in tokens")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--tasks", default="", help="lm-eval task names, comma-separated (needs lm-eval installed)")
    p.add_argument("--task-limit", type=_positive_int, default=None)
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
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("moeoffload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as a killed-by-SIGPIPE tool would
        if not _stdout_closed():
            raise  # another pipe: not the reader of our output going away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush must not raise again)
        return 141
    except UsageError as e:
        message = str(e)
    except MoeoffloadError as e:  # the named errors: a table, a bound, a budget, a model without experts, ...
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    except OSError as e:  # the machine's, not the command's: a full disk (stdout on /dev/full), an I/O error
        print(f"moeoffload: error: {_one_line(f'{e.filename}: {e.strerror}' if e.filename else e)}", file=sys.stderr)
        return 1
    print(f"moeoffload: error: {_one_line(message)}", file=sys.stderr)
    return 2

