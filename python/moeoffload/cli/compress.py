"""`moeoffload compress`: build a model's expert table, streamed to disk tensor by tensor.

    moeoffload compress --model path/to/checkpoint --policy policy.json --out experts.table
    moeoffload compress --model default --error-bound 0.3 --out tiny.table      # 0.3 x mean|w| everywhere

The table stores the experts as the transformers 5 experts modules hold them
(per-expert w1/w3 fused into gate_up_proj), ready for `moeoffload run --table`.
"""

from __future__ import annotations

import shutil
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
    try:  # claimed by this command, atomically: only a directory it made goes when the build fails
        out.mkdir(parents=True)
        made = True
    except OSError:  # there already (or cannot be made: said next)
        made = False
    _writable_dir(out)
    bound = args.policy or (args.error_bound if args.error_bound is not None else
                            (str(model_dir / "policy.json") if (model_dir / "policy.json").exists() else 0.3))
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        transposed = moe_layers(AutoModelForCausalLM.from_config(config))[0].experts.is_transposed
    try:
        t = table.build(model_dir, bound, args.codec, mode="meanabs", fuse=True,
                        transpose=transposed and args.codec != "none", out=out, progress=not args.quiet)
    except BaseException:
        if made:  # what this command made and could not finish (a bound too small, say): nothing half-written stays
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"{out}: {t.num_layers} MoE layers x {t.experts_per_layer} experts, codec {args.codec}, "
          f"{t.bits_per_weight():.3f} bits/weight, {int(t.expert_bytes().sum()) / 2**20:.2f} MiB")
    t.close()
    return 0
