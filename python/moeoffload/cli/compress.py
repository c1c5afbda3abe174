"""`moeoffload compress`: build a model's expert table, streamed to disk tensor by tensor.

    moeoffload compress --model path/to/checkpoint --policy policy.json --out experts.table
    moeoffload compress --model default --error-bound 0.3 --out tiny.table      # 0.3 x mean|w| everywhere

The table stores the experts as the transformers 5 experts modules hold them
(per-expert w1/w3 fused into gate_up_proj), ready for `moeoffload run --table`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path


def add_parser(sub) -> None:
    from . import _alpha

    p = sub.add_parser("compress", help="compress a model's experts into a table (streamed to disk)")
    p.add_argument("--model", default="default", help="a Hugging Face MoE checkpoint directory, or 'default'")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--policy", default=None, help="a per-layer policy JSON (`moeoffload policy`)")
    bound.add_argument("--error-bound", type=_alpha, default=None, help="one bound for every layer, x mean|w|")
    p.add_argument("--codec", choices=("szp", "szpe", "sz3", "none"), default="szp",
                   help="szp (fixed width); szpe (the same values entropy coded: fewer bytes in host memory and "
                        "over the bus, transcoded to szp on arrival); sz3; none (the raw weights)")
    p.add_argument("--out", required=True, help="the table directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd)


def cmd(args) -> int:
    from moeoffload import table
    from moeoffload.models.adapters import moe_layers

    from . import UsageError, _check_model, _path_arg, _writable_dir

    out = _path_arg(args.out, "--out")
    model_dir, config = _check_model(args.model)
    if args.policy is not None:
        if not Path(args.policy).is_file():
            raise UsageError(f"--policy {args.policy}: no such file")
        from moeoffload.policy import BoundPolicy

        BoundPolicy.from_any(args.policy)  # a malformed one is named before --out is made
    if (out / table.MANIFEST_FILE).exists():
        raise UsageError(f"--out {out}: a table is there already; choose another directory or remove it")
    made = _make_dirs(out)  # nearest first
    try:
        _writable_dir(out)
        bound = args.policy or (args.error_bound if args.error_bound is not None else
                                (str(model_dir / "policy.json") if (model_dir / "policy.json").exists() else 0.3))
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            transposed = moe_layers(AutoModelForCausalLM.from_config(config))[0].experts.is_transposed
        with _claimed(out):
            entries = sorted(e.name for e in out.iterdir())
            if entries:  # the model's own directory, a table being written, anyone's files: nothing is overwritten
                raise UsageError(f"--out {out}: not empty (it holds {', '.join(entries[:3])}"
                                 f"{', ...' if len(entries) > 3 else ''}); compress writes a new or empty directory")
            try:
                with _signals_end_as_exit():
                    t = table.build(model_dir, bound, args.codec, mode="meanabs", fuse=True,
                                    transpose=transposed and args.codec != "none", out=out, progress=not args.quiet)
            except BaseException:  # what it wrote, while it still holds --out (empty when it claimed it)
                for e in out.iterdir():
                    shutil.rmtree(e, ignore_errors=True) if e.is_dir() and not e.is_symlink() else e.unlink(True)
                raise
    except BaseException:  # and the directories it made, where nobody else's files went since (else they stay)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    print(f"{out}: {t.num_layers} MoE layers x {t.experts_per_layer} experts, codec {args.codec}, "
          f"{t.bits_per_weight():.3f} bits/weight, {int(t.expert_bytes().sum()) / 2**20:.2f} MiB")
    t.close()
    return 0


def _make_dirs(path: Path) -> list[Path]:
    """Makes `path` and its missing parents; the ones it made, nearest first (none: it was there, or cannot
    be made, which _writable_dir then says)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True)
    except OSError:
        return []
    return missing


@contextlib.contextmanager
def _claimed(out: Path):
    """Holds an exclusive lock on the directory (flock: released when the process ends, however it ends),
    so that two commands writing one --out cannot interleave their files, nor one delete the other's."""
    from . import UsageError

    try:
        import fcntl
    except ImportError:  # (no flock: Windows)
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out}: another moeoffload compress is writing there") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_end_as_exit():
    """SIGTERM and SIGHUP end the build as Ctrl-C does, through its clean-up (their default kills the
    process and left experts.safetensors.tmp behind)."""
    def end(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # (main() called from a thread: no handlers)
        yield
        return
    # only where the signal would kill: an ignored one stays ignored (nohup ignores SIGHUP)
    old = {s: signal.signal(s, end) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None))
           if s is not None and signal.getsignal(s) is signal.SIG_DFL}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
