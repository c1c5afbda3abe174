"""Train the embedded default model: a tiny byte-level Mixtral on the stdlib.

The corpus is the Python standard library's own ``.py`` files (every machine
has them offline), split into train and held-out **by file**: a file is held
out when crc32 of its path relative to the stdlib root is 0 mod 10. The model
is a ``MixtralForCausalLM`` (transformers), byte vocabulary plus three
specials, 8 experts top-2, trained with the router load-balancing loss so every
expert is used. Deterministic for a given seed, Python version (the corpus)
and thread count.

Writes into ``--out``: the checkpoint (config.json + model.safetensors, bf16),
``heldout.txt`` (a fixed held-out sample, the default data of the sensitivity
study and the tests), ``routing-heldout.npy`` (the experts each held-out token
chose at every layer) and ``training.json`` (the command, the corpus, the
loss curve, held-out bits per byte next to unigram and bigram baselines).

    python tools/train_tiny_moe.py --out python/moeoffload/models/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from moeoffload.models import tiny_moe

HELDOUT_SAMPLE_BYTES = 96 * 1024


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    return root, files


def split_corpus() -> tuple[bytes, bytes, dict]:
    root, files = stdlib_files()
    train, held = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        (held if zlib.crc32(rel.encode()) % 10 == 0 else train).append(data)
    info = {"stdlib": str(root), "python": platform.python_version(),
            "files_train": len(train), "files_heldout": len(held)}
    return b"\n".join(train), b"\n".join(held), info


def ngram_baselines(train: np.ndarray, held: np.ndarray) -> dict:
    """Held-out bits per byte of add-1/2 smoothed unigram and bigram models."""
    uni = np.bincount(train, minlength=256).astype(np.float64) + 0.5
    uni /= uni.sum()
    uni_bpb = float(-np.log2(uni[held]).mean())
    big = np.zeros((256, 256))
    np.add.at(big, (train[:-1], train[1:]), 1.0)
    big += 0.5
    big /= big.sum(axis=1, keepdims=True)
    big_bpb = float(-np.log2(big[held[:-1], held[1:]]).mean())
    return {"unigram_bpb": uni_bpb, "bigram_bpb": big_bpb}


def per_layer_balance_loss(router_logits, k: int) -> torch.Tensor:
    """Switch-style load balancing, per layer then averaged: E * sum_i f_i * P_i,
    f_i the fraction of top-k slots expert i takes, P_i its mean router
    probability. (transformers' Mixtral loss concatenates all layers first,
    which balances experts across layers, not within each: some experts of some
    layers then die.) 1.0 when perfectly balanced."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        E = probs.shape[-1]
        top = probs.topk(k, dim=-1).indices
        frac = torch.zeros(E, device=probs.device).scatter_add_(0, top.reshape(-1), torch.ones(top.numel(), device=probs.device))
        frac = frac / top.numel()
        losses.append(E * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-bytes", type=int, default=262144)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--balance", type=float, default=0.05, help="weight of the per-layer load-balancing loss")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_bytes, held_bytes, corpus = split_corpus()
    train = np.frombuffer(train_bytes, dtype=np.uint8)
    held = np.frombuffer(held_bytes, dtype=np.uint8)
    corpus.update(bytes_train=int(train.size), bytes_heldout=int(held.size))
    print(f"corpus: {corpus}", flush=True)

    model = tiny_moe.new_model(seed=args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,} ({n_params * 2 / 2**20:.2f} MiB in bf16)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = np.random.default_rng(args.seed)
    train_t = torch.from_numpy(train.astype(np.int64))
    curve = []
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = gen.integers(0, train.size - args.seq, size=args.batch)
        idx = torch.from_numpy(starts)[:, None] + torch.arange(args.seq - 1)[None, :]
        inputs = tiny_moe.with_bos(train_t[idx]).to(args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=inputs, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1))
        aux_loss = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
        loss = lm_loss + args.balance * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            aux = aux_loss.item()
            lm = lm_loss.item()
            curve.append({"step": step, "lm_loss": lm, "aux_loss": aux, "seconds": time.time() - t0})
            print(f"step {step:5d}  lm {lm:.4f} nats  ({lm / math.log(2):.3f} bpb)  aux {aux:.3f}  "
                  f"{time.time() - t0:7.1f}s", flush=True)

    model.eval()
    model = model.to("cpu").to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    tiny_moe.save(model, args.out)
    reloaded = tiny_moe.load(args.out)

    eval_bytes = held[: args.eval_bytes]
    bpb = tiny_moe.bits_per_byte(reloaded, eval_bytes.tobytes(), seq=args.seq)
    usage = tiny_moe.expert_usage(reloaded, eval_bytes.tobytes(), seq=args.seq)
    baselines = ngram_baselines(train, eval_bytes)
    sample = held_bytes[:HELDOUT_SAMPLE_BYTES]
    (args.out / "heldout.txt").write_bytes(sample)
    traces = tiny_moe.routing_traces(reloaded, sample, seq=args.seq)
    np.save(args.out / "routing-heldout.npy", traces)

    report = {
        "command": " ".join(["python", "tools/train_tiny_moe.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "corpus": corpus,
        "parameters": n_params,
        "train_seconds": round(time.time() - t0, 1),
        "heldout_eval_bytes": int(eval_bytes.size),
        "heldout_bpb": bpb,
        **baselines,
        "expert_usage_heldout": usage.tolist(),
        "routing_traces": {"file": "routing-heldout.npy", "shape": list(traces.shape),
                           "layout": "sequence, token, layer, top-k slot -> expert id"},
        "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out bits/byte: model {bpb:.3f}  bigram {baselines['bigram_bpb']:.3f}  "
          f"unigram {baselines['unigram_bpb']:.3f}")
    print("expert usage (fraction of top-2 slots, per layer):")
    print(np.array2string(usage, precision=3))


if __name__ == "__main__":
    main()
