"""Side-by-side measurement of codecs on a set of matrices (used by `moeoffload demo` and bench/codec.py).

Each matrix is compressed at eb = factor x its standard deviation (or at the absolute bound `bounds`
gives it). Reported per codec, summed over the matrices: bits per weight, ratio against bf16,
relative L2 error, max error / eb, encode / decode throughput in MB/s of the input (float32 for
MiniLM), and for szp and szpe the order-0 entropy H0 of szp's quantised values (per matrix, summed:
what a per-matrix entropy coder can reach). Decode throughput is the best of `repeats` runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import _native
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
    h0_bits_per_weight: float | None = None  # szp / szpe: H0 of the quantised values

    def as_dict(self) -> dict:
        return asdict(self)


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def order0_bits(ct: _codec.CompressedTensor) -> float:
    """Bits the order-0 entropy of an szp or szpe tensor's quantised values q says they need."""
    q = np.asarray(_native.szp_quantised(ct.to_szp().buffer))
    if q.size == 0:
        return 0.0
    _, counts = np.unique(q, return_counts=True)
    return float(-(counts * np.log2(counts / q.size)).sum())


def evaluate(matrices: dict[str, torch.Tensor], factor: float, codec: str, repeats: int = 5,
             bounds: dict[str, float] | None = None, **options) -> CodecResult:
    n = nbytes = exceptions = 0
    t_enc = t_dec = t_into = 0.0
    err2 = ref2 = 0.0
    worst = h0 = 0.0
    fixed_width = codec in ("szp", "szpe")
    for name, w in matrices.items():
        eb = bounds[name] if bounds is not None else factor * float(w.float().std())
        t0 = time.perf_counter()
        ct = _codec.compress(w, eb, codec=codec, **options)
        t_enc += time.perf_counter() - t0
        y = ct.decompress()
        t_dec += _best_time(ct.decompress, repeats)
        if fixed_width:
            out = torch.empty_like(y)
            t_into += _best_time(lambda: ct.decompress(out=out), repeats)
            h0 += order0_bits(ct)
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
        decode_into_mb_s=in_mb / t_into if fixed_width else None,
        h0_bits_per_weight=h0 / n if fixed_width else None,
    )


def format_table(results: list[CodecResult]) -> str:
    head = (
        f"{'codec':<22}{'eb/std':>7}{'bits/w':>8}{'x bf16':>8}{'relL2':>10}{'max/eb':>8}"
        f"{'exc':>6}{'enc MB/s':>10}{'dec MB/s':>10}{'into MB/s':>11}{'H0':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        into = f"{r.decode_into_mb_s:11.0f}" if r.decode_into_mb_s else f"{'-':>11}"
        into += f"{r.h0_bits_per_weight:7.3f}" if r.h0_bits_per_weight is not None else f"{'-':>7}"
        lines.append(
            f"{r.codec:<22}{r.factor:>7.2f}{r.bits_per_weight:>8.3f}{r.ratio_vs_bf16:>8.2f}{r.rel_l2_error:>10.2e}"
            f"{r.max_err_over_eb:>8.3f}{r.exceptions:>6d}{r.encode_mb_s:>10.0f}{r.decode_mb_s:>10.0f}{into}"
        )
    return "\n".join(lines)
