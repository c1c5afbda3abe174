"""bench/e2e.py's model builders and trace-driven routing: the trace's experts are the ones the experts
module computes, every system replays a sequence the same way, and the shaped stacks' expert weights have
the per-matrix statistics the script states."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moeoffload import sim
from moeoffload.models.adapters import moe_layers

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_qwen3(seed=0):
    cfg = transformers.AutoConfig.for_model("qwen3_moe", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=128, num_experts=8, num_experts_per_tok=2,
                                            moe_intermediate_size=32, intermediate_size=64, head_dim=16)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def capture_routing(model):
    seen = {}
    hooks = [ml.experts.register_forward_pre_hook(
        lambda mod, args, l=ml.index: seen.setdefault(l, []).append(args[1].clone())) for ml in moe_layers(model)]
    return seen, hooks


def test_trace_routing_drives_every_layer_and_replays(e2e):
    model = tiny_qwen3()
    trace = sim.synthetic_trace(num_sequences=3, tokens=10, num_layers=3, experts=8, k=2, seed=4)
    routing = e2e.TraceRouting(model, trace)
    seen, hooks = capture_routing(model)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing.begin(2)
        model(ids[:, :6])  # a prefill of 6 tokens, then two single tokens: positions 0..7
        model(ids[:, 6:7])
        model(ids[:, 7:8])
        for l in range(3):
            got = torch.cat(seen[l]).numpy()
            assert np.array_equal(got, trace[2, :8, l].astype(np.int64)), l
        seen.clear()
        routing.begin(2)  # the reference replays the same sequence from token 0
        model(ids[:, :8])
        assert np.array_equal(seen[1][0].numpy(), trace[2, :8, 1].astype(np.int64))
        with pytest.raises(RuntimeError, match="ran past"):
            model(ids[:, :5])
    routing.remove()
    for h in hooks:
        h.remove()
    seen, hooks = capture_routing(model)
    with torch.no_grad():
        model(ids[:, :4])  # hooks removed: the router routes again (top-2 of its own scores)
    scores = seen[0][0]
    assert scores.shape == (4, 2)


def test_history_matrices_count_the_trace(e2e):
    trace = sim.synthetic_trace(num_sequences=4, tokens=7, num_layers=3, experts=8, k=2, seed=1)
    mats = sim.activation_matrices(trace, 8)
    assert len(mats) == 4 and all(m.sum() == 7 * 3 * 2 for m in mats)
    hist = sim.history_from_trace(trace, 8)
    assert np.array_equal(hist.flat().reshape(4, -1), np.stack(mats))


@pytest.mark.parametrize("role", ["in", "out"])
def test_checkpoint_like_weights_have_the_stated_statistics(e2e, role):
    g = torch.Generator().manual_seed(0)
    w = e2e.checkpoint_like((768, 2048), role, g).double()
    h, c = e2e.WEIGHT_STATS[role]
    std = w.std().item() * math.sqrt(2048)
    z = (w - w.mean()) / w.std()
    kurt = (z**4).mean().item() - 3
    assert 0.6 * c < std < 1.6 * c
    if role == "in":
        assert 0.3 < kurt < 2.5 and z.abs().max() < 15
    else:
        assert kurt > 4 and z.abs().max() > 15  # heavy tails and the planted outliers


def test_a_shallow_stack_reports_its_rate_at_the_models_depth(e2e):
    # The GPU run decodes a 4-layer Qwen3-shaped stack; the 80 tokens/s target is for 48 layers.
    meta = {"model": "qwen3-4l", "device": "test", "command": "python bench/e2e.py", "prompts": 1, "prompt_tokens": 8,
            "new_tokens": 4, "full_depth": {"layers": 48, "stack_layers": 4}}
    row = {"routing": "trace", "budget": "25%", "system": "moeoffload", "prefill_tokens_per_s": 1.0,
           "decode_tokens_per_s": 960.0, "decode_s_per_token": 1 / 960, "bus_bytes_per_token": 0.0, "hit_rate": 1.0,
           "stall_fraction": 0.0, "peak_device_bytes": 0, "perplexity": 1.0,
           "decode_tokens_per_s_full_depth": 80.0}
    md = e2e.table_md([row, {"routing": "trace", "budget": "25%", "system": "accelerate", "skipped": "no GPU"}], meta)
    assert "Decode at 48 layers" in md and "trace 25% moeoffload 80.0 tok/s" in md
    assert e2e.FULL_LAYERS == {"mixtral": 32, "qwen3": 48}


def test_cached_experts_bench_runs_and_its_fused_kernel_matches_dense(tmp_path):
    """bench/cached_experts.py (a stage of the GPU run) runs end to end on this backend: one row per call
    and token count, the fused kernel within bf16 rounding of dense on the same decoded weights."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cached_experts.py"), "--tokens", "1", "--repeats", "1",
                        "--experts", "8", "--calls", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (found,) = tmp_path.glob("cached_experts-*.json")
    doc = json.loads(found.read_text())
    assert [row["what"] for row in doc["rows"]] == ["expert_mlp fused (szp)", "expert_mlp dense (bf16)",
                                                   "moe_experts fused (szp, 8 experts)", "8 experts dense (bf16)"]
    assert all(row["us"] > 0 and row["weight_GBps"] > 0 for row in doc["rows"])
    assert doc["rows"][0]["kernel_rel_err"] < 0.02 and 2 < doc["meta"]["szp_bits_per_weight"] < 8
    assert (found.with_suffix(".md")).read_text().count("| 1 |") == 4
