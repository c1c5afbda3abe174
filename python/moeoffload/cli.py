"""`moeoffload` command line: demo and info (compress, run, bench, sensitivity come with their issues)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import moeoffload

    print(json.dumps(moeoffload.backend_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    import moeoffload
    from moeoffload import codec_eval, samples

    info = moeoffload.backend_info()
    print(f"moeoffload {moeoffload.__version__}: backend {info['backend']} "
          f"(CUDA kernels {'built' if info['built_with_cuda'] else 'not built'}; "
          f"{info['device_name'] or info['reason']}), {info['num_threads']} CPU threads")
    weights = samples.minilm_ffn_weights()
    n = sum(w.numel() for w in weights.values())
    print(f"Real trained weights: {len(weights)} FFN matrices of all-MiniLM-L6-v2, {n / 1e6:.2f} M values (float32)")
    print(f"Error bound eb = {args.factor} x std of each matrix; every weight checked within eb.\n")
    results = [codec_eval.evaluate(weights, args.factor, c, repeats=args.repeats) for c in ("szp", "sz3")]
    print(codec_eval.format_table(results))
    bad = [r.codec for r in results if r.max_err_over_eb > 1.0]
    if bad:
        print(f"\nBOUND VIOLATED by {bad}", file=sys.stderr)
        return 1
    szp, sz3 = results
    print(f"\nszp: {szp.bits_per_weight / sz3.bits_per_weight:.2f}x the bytes of SZ3, "
          f"decode {szp.decode_mb_s / sz3.decode_mb_s:.1f}x faster (decompress()), "
          f"{szp.decode_into_mb_s / sz3.decode_mb_s:.1f}x into a reused buffer.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compress real trained weights with szp and SZ3, side by side")
    p.add_argument("--factor", type=float, default=0.05, help="error bound as a fraction of each matrix's std")
    p.add_argument("--repeats", type=int, default=3, help="decode timings: best of this many runs")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("info", help="print what the build holds and what the machine offers")
    p.set_defaults(fn=_cmd_info)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
