"""Which szp block format saves bits on real weights? An estimate from the quantised values.

    python bench/szp_variants.py

For each eb factor, bits per weight of block-format variants computed exactly
from q = round(w / 2eb) of the all-MiniLM-L6-v2 FFN matrices (no encoder
needed: each variant's size is a function of q): block sizes 16/32/64, the
width byte vs a 4-bit width, one outlier per block stored apart, and a
per-block offset (min-subtracted unsigned values instead of sign + magnitude).
The entropy of q is the floor for any coder without a predictor.
"""

from __future__ import annotations

import numpy as np

from moeoffload import samples


def widths(m: np.ndarray) -> np.ndarray:
    return np.where(m > 0, np.floor(np.log2(np.maximum(m, 1))) + 1, 0)


def blocks(q: np.ndarray, size: int) -> np.ndarray:
    pad = (-q.size) % size
    return np.concatenate([q.ravel(), np.zeros(pad, q.dtype)]).reshape(-1, size)


def sign_magnitude(q, size=32, header=8):
    b = widths(np.abs(blocks(q, size)).max(1))
    return (header + np.where(b > 0, size * (b + 1), 0)).sum() / q.size


def one_outlier(q, size=32, header=8):
    a = np.sort(np.abs(blocks(q, size)), axis=1)
    b = widths(a[:, -2])
    out_bits = np.log2(size) + widths(a[:, -1]) + 1  # position + magnitude + sign
    return (header + np.where(b > 0, size * (b + 1), 0) + out_bits).sum() / q.size


def block_offset(q, size=32, header=8):
    blk = blocks(q, size)
    lo = blk.min(1)
    b = widths((blk.max(1) - lo))
    return (header + 32 + size * b).sum() / q.size  # 32-bit offset per block


def entropy(q):
    _, c = np.unique(q, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    weights = [w.numpy() for w in samples.minilm_ffn_weights().values()]
    cols = ["B=16", "B=32 (szp)", "B=64", "4-bit width", "1 outlier", "block offset", "entropy"]
    print(f"{'eb/std':>7}" + "".join(f"{c:>14}" for c in cols))
    for f in (0.02, 0.05, 0.1, 0.2):
        qs = [np.round(w / (2 * f * w.std())).astype(np.int64) for w in weights]
        n = sum(q.size for q in qs)

        def avg(fn, **kw):
            return sum(fn(q, **kw) * q.size for q in qs) / n

        row = [avg(sign_magnitude, size=16), avg(sign_magnitude), avg(sign_magnitude, size=64),
               avg(sign_magnitude, header=4), avg(one_outlier), avg(block_offset),
               sum(entropy(q) * q.size for q in qs) / n]
        print(f"{f:>7.2f}" + "".join(f"{v:>14.3f}" for v in row))


if __name__ == "__main__":
    main()
