"""Do expert copies overlap compute? Compute alone, copies alone, both together, in one run.
And does the copy engine keep the bus busy with expert-sized copies?

    python bench/transfer_overlap.py [--mib 64] [--copies 32] [--expert-kib 1700 --expert-copies 192]

Copies go through the TransferEngine (2 copy streams) from pinned host memory
into device memory; compute is a chain of bf16 matmuls on the default stream
(GPU) or float32 matmuls on one torch thread (CPU backend: copies are worker
memcpys). Perfect overlap makes "both" take max(compute, copies), no overlap
their sum.

Expert copies: --expert-copies copies of one expert's bytes (1700 KiB: a
Qwen3-30B-A3B expert as szp at about 3 bits a weight) queued at once, on 1 and
2 copy streams, with each stream issuing up to 8 copies ahead of the one it
completes (the engine's default) and one at a time (issue_ahead=1: a stream
idles while its thread wakes up and queues the next). On the cpu backend the
worker copies itself and issue_ahead changes nothing.

Writes bench/results/transfer_overlap-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import moeoffload
from moeoffload import _native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="size of one copy")
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--matmuls", type=int, default=0, help="compute steps (0: sized to about the copy time)")
    ap.add_argument("--expert-kib", type=int, default=1700, help="size of one expert-sized copy")
    ap.add_argument("--expert-copies", type=int, default=192)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    info = moeoffload.backend_info()
    cuda = info["backend"] == "cuda" and torch.cuda.is_available()
    backend = "cuda" if cuda else "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    n = args.mib << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, pin_memory=cuda)
    dst = [torch.empty(n, dtype=torch.uint8, device=device) for _ in range(4)]
    engine = _native.TransferEngine(backend, 2)
    dim = 8192 if cuda else 768
    a = torch.randn(dim, dim, device=device, dtype=torch.bfloat16 if cuda else torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def compute(steps):
        x = a
        for _ in range(steps):
            x = (x @ a).clamp_(-1, 1)
        sync()

    def copies():
        handles = [engine.copy(src.numpy(), dst[i % len(dst)], tag=i)
                   for i in range(args.copies)]
        for h in handles:
            h.wait()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    copies()
    compute(2)  # warm up
    t_copy = min(timed(copies) for _ in range(3))
    steps = args.matmuls
    if steps == 0:
        t_one = timed(lambda: compute(4)) / 4
        steps = max(1, int(t_copy / t_one))
    t_compute = min(timed(lambda: compute(steps)) for _ in range(3))

    def both():
        handles = [engine.copy(src.numpy(), dst[i % len(dst)], tag=i) for i in range(args.copies)]
        compute(steps)
        for h in handles:
            h.wait()

    t_both = min(timed(both) for _ in range(3))
    engine.close()
    overlap = (t_compute + t_copy - t_both) / min(t_compute, t_copy)

    e_bytes = args.expert_kib << 10
    e_src = torch.randint(0, 256, (e_bytes,), dtype=torch.uint8, pin_memory=cuda).numpy()
    e_dst = [torch.empty(e_bytes, dtype=torch.uint8, device=device) for _ in range(16)]
    expert_rows = []
    for streams in (1, 2):
        for ahead in (1, 8):
            eng = _native.TransferEngine(backend, streams, ahead)

            def expert_copies():
                hs = [eng.copy(e_src, e_dst[i % len(e_dst)], tag=i) for i in range(args.expert_copies)]
                for h in hs:
                    h.wait()

            expert_copies()  # warm up
            t = min(timed(expert_copies) for _ in range(3))
            eng.close()
            expert_rows.append({"streams": streams, "issue_ahead": ahead, "s": t,
                                "GB_s": args.expert_copies * e_bytes / t / 1e9,
                                "us_per_copy": 1e6 * t / args.expert_copies})
    name = info["device_name"] if cuda else "cpu"
    doc = {"command": "python bench/transfer_overlap.py " + " ".join(sys.argv[1:]), "device": name,
           "backend": backend, "copy_bytes": n, "copies": args.copies, "matmul_steps": steps, "matmul_dim": dim,
           "compute_s": t_compute, "copy_s": t_copy, "both_s": t_both,
           "copy_GB_s": args.copies * n / t_copy / 1e9,
           "overlap_fraction": overlap,
           "expert_copy_bytes": e_bytes, "expert_copies": args.expert_copies, "expert_copy_rows": expert_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not cuda else name.lower().replace(" ", "-")
    (args.out / f"transfer_overlap-{slug}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = (f"# Transfer/compute overlap ({name}, {backend} backend)\n\n`{doc['command'].strip()}`\n\n"
          f"| compute alone | copies alone | both | sum | overlap |\n|---|---|---|---|---|\n"
          f"| {1e3 * t_compute:.1f} ms | {1e3 * t_copy:.1f} ms ({doc['copy_GB_s']:.1f} GB/s) | {1e3 * t_both:.1f} ms | "
          f"{1e3 * (t_compute + t_copy):.1f} ms | {100 * overlap:.0f}% of the shorter hidden |\n\n"
          f"{args.expert_copies} copies of {args.expert_kib} KiB queued at once:\n\n"
          f"| copy streams | issued ahead a stream | time | GB/s | µs a copy |\n|---|---|---|---|---|\n" +
          "".join(f"| {r['streams']} | {r['issue_ahead']} | {1e3 * r['s']:.1f} ms | {r['GB_s']:.1f} | "
                  f"{r['us_per_copy']:.1f} |\n" for r in expert_rows))
    (args.out / f"transfer_overlap-{slug}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
