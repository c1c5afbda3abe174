"""szp, szpe and SZ3 on real trained weights, one run, one table.

    python bench/codec.py [--out bench/results] [--repeats 5]

Weights: the FFN matrices of all-MiniLM-L6-v2 in float32 and in bfloat16, each at eb = {0.02, 0.05,
0.1, 0.2, 0.5, 1.0} x its std; and the shipped model's experts at the shipped policy's bound per layer.
Per codec: bits per weight, ratio vs bf16, relative L2 error, max error / eb, encode and decode MB/s
(of the input), and for szp and szpe the order-0 entropy H0 of szp's quantised values. Codecs: szp
(fixed-width blocks), szpe (the same values rANS coded), SZ3 with no predictor (its best ratio on
weights) and SZ3's default interpolation+Lorenzo. Checks in the same run: szpe bytes <= 1.08 x H0 and
below the smaller SZ3 at every bound; szpe decode >= 3x the faster SZ3's; szp decode >= 10x it and
szp bytes <= 1.35x SZ3's. With a CUDA GPU, also times the CUDA decoder on a 1 GiB bf16 expert-like
tensor (GB/s of bf16 output, CUDA events) and checks it equal to the CPU decoder.
Writes codec-<device>.json and codec-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import moeoffload
from moeoffload import codec, codec_eval, samples

FACTORS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def cuda_decode(gib: float = 1.0, repeats: int = 20) -> dict:
    rows, cols = int(gib * 2**30 / 2 / 4096), 4096
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    ct = codec.compress(w, 0.05 * 0.02)
    cpu = ct.decompress()
    dev = torch.device("cuda")
    dev_buf = torch.from_numpy(ct.buffer).to(dev)
    out = torch.empty(ct.shape, dtype=ct.dtype, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    from moeoffload import _native

    _native.szp_decode_cuda(ct.buffer, dev_buf, out, stream)
    torch.cuda.synchronize()
    equal = bool(torch.equal(out.cpu().view(torch.int16), cpu.view(torch.int16)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        _native.szp_decode_cuda(ct.buffer, dev_buf, out, stream)
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / repeats
    copy = torch.empty_like(out)
    start.record()
    for _ in range(repeats):
        copy.copy_(out)
    end.record()
    torch.cuda.synchronize()
    copy_sec = start.elapsed_time(end) / 1e3 / repeats
    out_bytes = w.numel() * 2
    return {
        "tensor": [rows, cols],
        "bits_per_value": ct.bits_per_value,
        "decode_gb_s_bf16_output": out_bytes / sec / 1e9,
        "device_copy_gb_s": 2 * out_bytes / copy_sec / 1e9,
        "equal_to_cpu_bit_for_bit": equal,
    }


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    info = moeoffload.backend_info()
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
        result["cuda"] = cuda_decode()

    lines = ["\n\n".join(tables), "",
             f"{'weights':<18}{'eb/std':>7}{'szpe/H0':>9}{'szpe/SZ3':>10}{'szpe dec x SZ3':>16}"
             f"{'szp/SZ3':>9}{'szp dec x SZ3':>15}{'bound':>7}"]
    for c in checks:
        fac = f"{c['factor']:.2f}" if c["factor"] != "policy" else "policy"
        lines.append(f"{c['weights']:<18}{fac:>7}{c['szpe_over_h0']:>9.3f}{c['szpe_bytes_over_best_sz3']:>10.3f}"
                     f"{c['szpe_decode_over_fastest_sz3']:>16.1f}{c['szp_bytes_over_best_sz3']:>9.3f}"
                     f"{c['szp_decode_over_fastest_sz3']:>15.1f}{'ok' if c['bound_held'] else 'BROKEN':>7}")
    if "cuda" in result:
        cu = result["cuda"]
        lines.append(f"\nCUDA decode {cu['tensor']} bf16: {cu['decode_gb_s_bf16_output']:.0f} GB/s of output "
                     f"(device copy {cu['device_copy_gb_s']:.0f} GB/s), equal to CPU: {cu['equal_to_cpu_bit_for_bit']}")
    text = "\n".join(lines)
    print(text)

    ok_szpe = all(c["bound_held"] and c["szpe_over_h0"] <= 1.08 and c["szpe_bytes_over_best_sz3"] < 1.0
                  and c["szpe_decode_over_fastest_sz3"] >= 3 for c in checks)
    ok_szp = all(c["szp_bytes_over_best_sz3"] <= 1.35 and c["szp_decode_over_fastest_sz3"] >= 10 for c in checks)
    result["figures_met"] = {"szpe": ok_szpe, "szp": ok_szp}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"codec-{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"codec-{device}.md").write_text(
        f"# szp, szpe and SZ3 on trained weights ({device})\n\n"
        f"`{result['command']}` on {result['machine']}, {result['date']}. "
        "MB/s are of the input; 'dec' is decompress() (allocates its output), 'into' is "
        "decompress(out=...) into a reused buffer; H0 is the order-0 entropy of szp's quantised values "
        "per matrix. Ratios compare with the best SZ3 variant of the same row group (smallest bytes, "
        "fastest decode).\n\n```\n" + text + "\n```\n"
    )
    print("\nfigures: szpe", "met" if ok_szpe else "NOT met", "| szp", "met" if ok_szp else "NOT met")
    return 0 if ok_szpe and ok_szp else 1


if __name__ == "__main__":
    sys.exit(main())
