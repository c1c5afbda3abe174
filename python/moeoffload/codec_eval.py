"""Side-by-side measurement of codecs on a set of matrices (used by `moeoffload demo` and bench/codec.py).

Each matrix is compressed at eb = factor x its standard deviation. Reported per
codec, summed over the matrices: bits per weight, ratio against bf16, relative
L2 error, max error / eb, and encode / decode throughput in MB/s of the input
(float32 for MiniLM). Decode throughput is the best of `repeats` runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from . import codec as _codec


@dataclass
class CodecResult:
    codec: str
    factor: float
    values: int
    bits_per_weight: float
    ratio_vs_bf16: float
    rel_l2_error: float
    max_err_over_eb: float
    exceptions: int
    encode_mb_s: float
    decode_mb_s: float  # decompress(): allocates its output, as SZ3's decompress does
    decode_into_mb_s: float | None  # decompress(out=...): szp's hot path; None where the codec has none

    def as_dict(self) -> dict:
        return asdict(self)


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def evaluate(matrices: dict[str, torch.Tensor], factor: float, codec: str, repeats: int = 5, **options) -> CodecResult:
    n = nbytes = exceptions = 0
    t_enc = t_dec = t_into = 0.0
    err2 = ref2 = 0.0
    worst = 0.0
    for w in matrices.values():
        eb = factor * float(w.float().std())
        t0 = time.perf_counter()
        ct = _codec.compress(w, eb, codec=codec, **options)
        t_enc += time.perf_counter() - t0
        y = ct.decompress()
        t_dec += _best_time(ct.decompress, repeats)
        if codec == "szp":
            out = torch.empty_like(y)
            t_into += _best_time(lambda: ct.decompress(out=out), repeats)
        d = w.double() - y.double()
        err2 += float((d * d).sum())
        ref2 += float((w.double() ** 2).sum())
        worst = max(worst, float(d.abs().max()) / eb)
        n += w.numel()
        nbytes += ct.nbytes
        exceptions += ct.n_exceptions
    in_mb = sum(w.numel() * w.element_size() for w in matrices.values()) / 1e6
    bits = 8.0 * nbytes / n
    return CodecResult(
        codec=codec if not options else f"{codec}({','.join(f'{v}' for v in options.values())})",
        factor=factor,
        values=n,
        bits_per_weight=bits,
        ratio_vs_bf16=16.0 / bits,
        rel_l2_error=(err2 / ref2) ** 0.5,
        max_err_over_eb=worst,
        exceptions=exceptions,
        encode_mb_s=in_mb / t_enc,
        decode_mb_s=in_mb / t_dec,
        decode_into_mb_s=in_mb / t_into if codec == "szp" else None,
    )


def format_table(results: list[CodecResult]) -> str:
    head = (
        f"{'codec':<22}{'eb/std':>7}{'bits/w':>8}{'x bf16':>8}{'relL2':>10}{'max/eb':>8}"
        f"{'exc':>6}{'enc MB/s':>10}{'dec MB/s':>10}{'into MB/s':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        into = f"{r.decode_into_mb_s:11.0f}" if r.decode_into_mb_s else f"{'-':>11}"
        lines.append(
            f"{r.codec:<22}{r.factor:>7.2f}{r.bits_per_weight:>8.3f}{r.ratio_vs_bf16:>8.2f}{r.rel_l2_error:>10.2e}"
            f"{r.max_err_over_eb:>8.3f}{r.exceptions:>6d}{r.encode_mb_s:>10.0f}{r.decode_mb_s:>10.0f}{into}"
        )
    return "\n".join(lines)
