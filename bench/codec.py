"""szp, szpe and SZ3 on real trained weights, one run, one table.

    python bench/codec.py [--out bench/results] [--repeats 5]

Weights: the FFN matrices of all-MiniLM-L6-v2 in float32 and in bfloat16, each at eb = {0.02, 0.05,
0.1, 0.2, 0.5, 1.0} x its std; and the shipped model's experts at the shipped policy's bound per layer.
Per codec: bits per weight, ratio vs bf16, relative L2 error, max error / eb, encode and decode MB/s
(of the input), and for szp and szpe the order-0 entropy H0 of szp's quantised values. Codecs: szp
(fixed-width blocks), szpe (the same values rANS coded), SZ3 with no predictor (its best ratio on
weights) and SZ3's default interpolation+Lorenzo. Checks in the same run: szpe bytes <= 1.08 x H0 and
below the smaller SZ3 at every bound; szpe decode >= 3x the faster SZ3's; szp decode >= 10x it and
szp bytes <= 1.35x SZ3's. With a CUDA GPU, also times szp's and szpe's CUDA decoders on a 1 GiB bf16
expert-like tensor (GB/s of bf16 output, CUDA events; szpe transcodes to szp on the device, then
decodes), checks both equal to the CPU decoder bit for bit, and times the pinned host-to-device copy
of each codec's bytes. Writes codec-<device>.json and codec-<device>.md; `--cuda-only` runs the GPU
part alone (codec-cuda-<device>.*), as tools/device_check.sh does on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moeoffload
from moeoffload import codec, codec_eval, samples

FACTORS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


CUDA_ROWS = ("szp", "szpe", "szpe-via-szp")


def cuda_decode(gib: float = 1.0, repeats: int = 20) -> dict:
    """On the GPU, a 1 GiB bf16 expert-like tensor (down-projection statistics of bench/e2e.py's
    checkpoint_like, 2048-column matrices stacked) at eb = 0.1 sigma, each row in GB/s of bf16 output and
    checked bit for bit against the CPU decoder: szp decode; szpe decoded straight to values (a warp a
    stream); and szpe transcoded to szp on the device, then decoded (the arrival step of the runtime's
    szp cache, plus the decode), with the transcode's own time. And the pinned host-to-device copy of
    each codec's bytes, which is what a miss pays on the bus."""
    from e2e import checkpoint_like

    from moeoffload import _native

    cols = 2048
    rows = int(gib * 2**30 / 2 / cols)
    g = torch.Generator().manual_seed(0)
    w = torch.cat([checkpoint_like((4096, cols), "out", g) for _ in range(rows // 4096)]).to(torch.bfloat16)
    eb = 0.1 * w.float().std().item()
    dev = torch.device("cuda")
    stream = torch.cuda.current_stream().cuda_stream
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn) -> float:  # seconds per call, CUDA events, after one warm-up call
        fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    out_bytes = w.numel() * 2
    result = {"tensor": list(w.shape), "eb_over_std": 0.1, "repeats": repeats}
    coded = {"szp": codec.compress(w, eb), "szpe": codec.compress(w, eb, codec="szpe")}
    cpu = coded["szp"].decompress()
    out = torch.empty(w.shape, dtype=torch.bfloat16, device=dev)
    failed = torch.zeros(1, dtype=torch.int32, device=dev)
    info = _native.szpe_inspect(coded["szpe"].buffer, False)
    szp_scratch = torch.empty(info["szp_total_bytes"], dtype=torch.uint8, device=dev)
    for name in CUDA_ROWS:
        ct = coded[name.split("-")[0]]
        host = torch.from_numpy(np.array(ct.buffer)).pin_memory()  # a writable copy, pinned
        dev_buf = torch.empty_like(host, device=dev)
        h2d = timed(lambda: dev_buf.copy_(host, non_blocking=True))
        if name == "szp":
            run = lambda: _native.szp_decode_cuda(ct.buffer, dev_buf, out, stream)  # noqa: E731
        elif name == "szpe":
            run = lambda: _native.szpe_decode_values_cuda(ct.buffer, dev_buf, failed, out, stream)  # noqa: E731
        else:
            run = lambda: _native.szpe_decode_cuda(ct.buffer, dev_buf, szp_scratch, failed, out, stream)  # noqa: E731
        failed.zero_()
        out.fill_(float("nan"))  # poisoned: every element must be written
        sec = timed(run)
        equal = bool(torch.equal(out.cpu().view(torch.int16), cpu.view(torch.int16))) and not failed.item()
        result[name] = {"bits_per_value": ct.bits_per_value, "bytes": int(ct.buffer.nbytes),
                        "decode_gb_s_bf16_output": out_bytes / sec / 1e9, "decode_ms": sec * 1e3,
                        "h2d_gb_s": ct.buffer.nbytes / h2d / 1e9, "h2d_ms": h2d * 1e3,
                        "equal_to_cpu_bit_for_bit": equal}
        if name == "szpe-via-szp":
            transcode = timed(lambda: _native.szpe_to_szp_cuda([ct.buffer], [dev_buf], [szp_scratch], failed, stream))
            result[name]["transcode_ms"] = transcode * 1e3
            result[name]["szp_equal_bit_for_bit"] = bool(np.array_equal(szp_scratch.cpu().numpy(), coded["szp"].buffer))
            result[name]["equal_to_cpu_bit_for_bit"] &= result[name]["szp_equal_bit_for_bit"] and not failed.item()
    result["szpe_streams"] = info["n_streams"]
    copy = torch.empty_like(out)
    copy_sec = timed(lambda: copy.copy_(out))
    result["device_copy_gb_s"] = 2 * out_bytes / copy_sec / 1e9  # bytes read + written
    host_bf16 = w.pin_memory()
    result["bf16_h2d_ms"] = timed(lambda: copy.copy_(host_bf16, non_blocking=True)) * 1e3
    result["arrival"] = arrival_latency()
    return result


ARRIVAL_STREAM_VALUES = (65536, 16384, 4096)


def arrival_latency(repeats: int = 25) -> list[dict]:
    """What a demand miss of an szpe expert waits for on the GPU: one Qwen3-30B-A3B-shaped expert (gate
    and up [768, 2048], down [2048, 768], bf16, bench/e2e.py's checkpoint_like statistics, eb = 0.3 sigma)
    at several stream lengths: its bits a value, the transcode of its three matrices in one launch (the
    runtime's arrival step) and in three launches one after another, and the pinned copy of its szpe and
    szp bytes. Each time is the median of `repeats` single calls on an idle GPU, so it is a latency
    (launch included), not a throughput. Every transcode is checked byte for byte against szp."""
    from e2e import checkpoint_like

    from moeoffload import _native

    g = torch.Generator().manual_seed(1)
    shapes = (((768, 2048), "in"), ((768, 2048), "in"), ((2048, 768), "out"))
    mats = [checkpoint_like(shape, role, g).to(torch.bfloat16) for shape, role in shapes]
    fixed = [codec.compress(m, 0.3 * m.float().std().item()) for m in mats]
    dev = torch.device("cuda")
    stream = torch.cuda.current_stream().cuda_stream
    failed = torch.zeros(1, dtype=torch.int32, device=dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def latency_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    def pinned(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(arr)).pin_memory()

    szp_host = [pinned(f.buffer) for f in fixed]
    szp_dev = [torch.empty_like(h, device=dev) for h in szp_host]
    szp_h2d = latency_ms(lambda: [d.copy_(h, non_blocking=True) for d, h in zip(szp_dev, szp_host)])
    rows = []
    for values in ARRIVAL_STREAM_VALUES:
        bufs = []
        for f in fixed:
            seg = _native.szp_inspect(f.buffer)["segment_len"]
            bufs.append(np.asarray(_native.szpe_from_szp(f.buffer, max(1, values // seg))))
        host = [pinned(b) for b in bufs]
        dev_bufs = [torch.empty_like(h, device=dev) for h in host]
        for d, h in zip(dev_bufs, host):
            d.copy_(h)
        outs = [torch.empty(_native.szpe_inspect(b, False)["szp_total_bytes"], dtype=torch.uint8, device=dev)
                for b in bufs]
        one = latency_ms(lambda: _native.szpe_to_szp_cuda(bufs, dev_bufs, outs, failed, stream))
        three = latency_ms(lambda: [_native.szpe_to_szp_cuda([b], [d], [o], failed, stream)
                                    for b, d, o in zip(bufs, dev_bufs, outs)])
        torch.cuda.synchronize()
        equal = not failed.item() and all(np.array_equal(o.cpu().numpy(), f.buffer) for o, f in zip(outs, fixed))
        values_total = sum(m.numel() for m in mats)
        rows.append({"stream_values": values, "streams": sum(_native.szpe_inspect(b, False)["n_streams"] for b in bufs),
                     "bits_per_value": 8 * sum(b.size for b in bufs) / values_total,
                     "szp_bits_per_value": 8 * sum(f.buffer.nbytes for f in fixed) / values_total,
                     "transcode_one_launch_ms": one, "transcode_three_launches_ms": three,
                     "szpe_h2d_ms": latency_ms(lambda: [d.copy_(h, non_blocking=True) for d, h in zip(dev_bufs, host)]),
                     "szp_h2d_ms": szp_h2d, "szp_equal_bit_for_bit": bool(equal)})
    return rows


def cuda_lines(cu: dict) -> list[str]:
    lines = [f"\nCUDA, a {cu['tensor'][0]}x{cu['tensor'][1]} bf16 expert-like tensor at eb = 0.1 sigma "
             f"(szpe: {cu['szpe_streams']} streams; device copy {cu['device_copy_gb_s']:.0f} GB/s read+write; its "
             f"bf16 bytes cross the bus in {cu['bf16_h2d_ms']:.1f} ms):",
             f"{'codec':<14}{'bits/w':>8}{'H2D ms':>9}{'H2D GB/s':>10}{'decode ms':>11}{'GB/s bf16 out':>15}{'equal':>7}"]
    for name in CUDA_ROWS:
        r = cu[name]
        lines.append(f"{name:<14}{r['bits_per_value']:>8.3f}{r['h2d_ms']:>9.2f}{r['h2d_gb_s']:>10.1f}"
                     f"{r['decode_ms']:>11.3f}{r['decode_gb_s_bf16_output']:>15.0f}"
                     f"{'yes' if r['equal_to_cpu_bit_for_bit'] else 'NO':>7}")
    lines.append(f"(szpe-via-szp: the transcode alone takes {cu['szpe-via-szp']['transcode_ms']:.3f} ms)")
    lines += ["", "The arrival of one Qwen3-30B-A3B-shaped szpe expert (3 matrices, 4.7M bf16 values, eb 0.3 sigma), "
              "median latency of single calls:",
              f"{'values/stream':>14}{'streams':>9}{'bits/w':>8}{'szp bits/w':>11}{'1 launch ms':>13}"
              f"{'3 launches ms':>15}{'szpe H2D ms':>13}{'szp H2D ms':>12}{'equal':>7}"]
    for r in cu.get("arrival", []):
        lines.append(f"{r['stream_values']:>14}{r['streams']:>9}{r['bits_per_value']:>8.3f}{r['szp_bits_per_value']:>11.3f}"
                     f"{r['transcode_one_launch_ms']:>13.3f}{r['transcode_three_launches_ms']:>15.3f}"
                     f"{r['szpe_h2d_ms']:>13.3f}{r['szp_h2d_ms']:>12.3f}{'yes' if r['szp_equal_bit_for_bit'] else 'NO':>7}")
    return lines


def shipped_experts() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The shipped model's expert matrices (bf16) and each one's absolute bound under the shipped policy."""
    from transformers import AutoModelForCausalLM

    from moeoffload.codec import absolute_bound
    from moeoffload.models.tiny_moe import DEFAULT_DIR as model_dir
    from moeoffload.models.adapters import moe_layers
    from moeoffload.policy import BoundPolicy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    policy = BoundPolicy.from_any(str(model_dir / "policy.json"))
    mats, bounds = {}, {}
    for ml in moe_layers(model):
        for pname, p in ml.experts.named_parameters():
            for e in range(p.shape[0]):
                key = f"{ml.name}.{pname}.{e}"
                mats[key] = p[e].detach().contiguous()
                bounds[key] = absolute_bound(mats[key], policy.bound(ml.index), policy.mode)
    return mats, bounds


def group(name, weights, factor, repeats, bounds=None) -> tuple[list, dict]:
    kw = dict(repeats=repeats, bounds=bounds)
    szp = codec_eval.evaluate(weights, factor, "szp", **kw)
    szpe = codec_eval.evaluate(weights, factor, "szpe", **kw)
    nopred = codec_eval.evaluate(weights, factor, "sz3", sz3_algorithm="nopred", **kw)
    interp = codec_eval.evaluate(weights, factor, "sz3", sz3_algorithm="interp_lorenzo", **kw)
    best_bytes = min(nopred.bits_per_weight, interp.bits_per_weight)
    fastest = max(nopred.decode_mb_s, interp.decode_mb_s)
    check = {
        "weights": name,
        "factor": factor if bounds is None else "policy",
        "szpe_over_h0": szpe.bits_per_weight / szpe.h0_bits_per_weight,
        "szpe_bytes_over_best_sz3": szpe.bits_per_weight / best_bytes,
        "szpe_decode_over_fastest_sz3": szpe.decode_mb_s / fastest,
        "szp_bytes_over_best_sz3": szp.bits_per_weight / best_bytes,
        "szp_decode_over_fastest_sz3": szp.decode_mb_s / fastest,
        "bound_held": all(r.max_err_over_eb <= 1.0 for r in (szp, szpe, nopred, interp)),
    }
    return [szp, szpe, nopred, interp], check


def write_results(stem: Path, result: dict, text: str, heading: str) -> None:
    """stem.json (the numbers) and stem.md (heading, then the printed table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"{heading}\n\n```\n{text}\n```\n")


def cuda_only(args, info) -> int:
    if not info["gpu_available"]:
        print("codec.py --cuda-only: no CUDA GPU (or a build without CUDA): backend_info", info, file=sys.stderr)
        return 2
    cu = cuda_decode(args.gib)
    device = info["device_name"].replace(" ", "-")
    met = (cu["szpe"]["decode_gb_s_bf16_output"] >= 300 and all(cu[r]["equal_to_cpu_bit_for_bit"] for r in CUDA_ROWS)
           and all(r["szp_equal_bit_for_bit"] for r in cu["arrival"]))
    result = {"command": "python bench/codec.py " + " ".join(sys.argv[1:]), "device": info["device_name"],
              "backend_info": info, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cuda": cu,
              "figures_met": {"szpe_decode_300_gb_s": met}}
    text = "\n".join(cuda_lines(cu))
    print(text)
    write_results(Path(args.out) / f"codec-cuda-{device}", result, text,
                  f"# szp and szpe on the GPU ({info['device_name']})\n\n`{result['command']}`, torch "
                  f"{torch.__version__}, {result['date']}. Decode GB/s count the bf16 output; H2D is a pinned "
                  "host-to-device copy of the codec's bytes (what a miss moves).")
    print("\nfigure: szpe decode >= 300 GB/s of bf16, bit for bit:", "met" if met else "NOT met")
    return 0 if met else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cuda-only", action="store_true",
                    help="only the GPU part (for a lent GPU machine, which lacks the MiniLM weights): writes "
                         "codec-cuda-<device>.json/.md; exit 0 when szpe decodes >= 300 GB/s of bf16, bit for bit")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the GPU part's bf16 tensor")
    args = ap.parse_args()

    info = moeoffload.backend_info()
    if args.cuda_only:
        return cuda_only(args, info)
    minilm = samples.minilm_ffn_weights()
    sets = {"minilm-fp32": minilm, "minilm-bf16": {k: w.to(torch.bfloat16) for k, w in minilm.items()}}
    rows, checks, tables = [], [], []
    for name, weights in sets.items():
        group_rows = []
        for f in FACTORS:
            r, c = group(name, weights, f, args.repeats)
            group_rows += r
            checks.append(c)
        rows += [dict(r.as_dict(), weights=name) for r in group_rows]
        tables.append(f"## {name}\n" + codec_eval.format_table(group_rows))
    experts, bounds = shipped_experts()
    r, c = group("tiny-moe-experts", experts, 0.0, args.repeats, bounds)
    rows += [dict(x.as_dict(), weights="tiny-moe-experts") for x in r]
    checks.append(c)
    tables.append("## tiny-moe-experts (the shipped policy)\n" + codec_eval.format_table(r))

    device = "cpu"
    result = {
        "command": "python bench/codec.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {info['num_threads']} threads",
        "weights": {"minilm": f"all-MiniLM-L6-v2 FFN, {len(minilm)} matrices, "
                              f"{sum(w.numel() for w in minilm.values())} values",
                    "tiny-moe-experts": f"{len(experts)} matrices, {sum(w.numel() for w in experts.values())} values bf16"},
        "backend_info": info,
        "rows": rows,
        "checks": checks,
        "date": time.strftime("%Y-%m-%d"),
    }
    if info["gpu_available"]:
        device = info["device_name"].replace(" ", "-")
        result["cuda"] = cuda_decode(args.gib)

    lines = ["\n\n".join(tables), "",
             f"{'weights':<18}{'eb/std':>7}{'szpe/H0':>9}{'szpe/SZ3':>10}{'szpe dec x SZ3':>16}"
             f"{'szp/SZ3':>9}{'szp dec x SZ3':>15}{'bound':>7}"]
    for c in checks:
        fac = f"{c['factor']:.2f}" if c["factor"] != "policy" else "policy"
        lines.append(f"{c['weights']:<18}{fac:>7}{c['szpe_over_h0']:>9.3f}{c['szpe_bytes_over_best_sz3']:>10.3f}"
                     f"{c['szpe_decode_over_fastest_sz3']:>16.1f}{c['szp_bytes_over_best_sz3']:>9.3f}"
                     f"{c['szp_decode_over_fastest_sz3']:>15.1f}{'ok' if c['bound_held'] else 'BROKEN':>7}")
    if "cuda" in result:
        lines += cuda_lines(result["cuda"])
    text = "\n".join(lines)
    print(text)

    ok_szpe = all(c["bound_held"] and c["szpe_over_h0"] <= 1.08 and c["szpe_bytes_over_best_sz3"] < 1.0
                  and c["szpe_decode_over_fastest_sz3"] >= 3 for c in checks)
    ok_szp = all(c["szp_bytes_over_best_sz3"] <= 1.35 and c["szp_decode_over_fastest_sz3"] >= 10 for c in checks)
    result["figures_met"] = {"szpe": ok_szpe, "szp": ok_szp}
    write_results(Path(args.out) / f"codec-{device}", result, text,
                  f"# szp, szpe and SZ3 on trained weights ({device})\n\n"
                  f"`{result['command']}` on {result['machine']}, {result['date']}. "
                  "MB/s are of the input; 'dec' is decompress() (allocates its output), 'into' is "
                  "decompress(out=...) into a reused buffer; H0 is the order-0 entropy of szp's quantised values "
                  "per matrix. Ratios compare with the best SZ3 variant of the same row group (smallest bytes, "
                  "fastest decode).")
    print("\nfigures: szpe", "met" if ok_szpe else "NOT met", "| szp", "met" if ok_szp else "NOT met")
    return 0 if ok_szpe and ok_szp else 1


if __name__ == "__main__":
    sys.exit(main())
