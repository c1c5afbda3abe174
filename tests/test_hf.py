"""moeoffload.offload on tiny random models of eight transformers 5 MoE families (integrations/hf.py):
codec "none" gives the original logits and greedy tokens exactly; szp runs the fused op and matches
the model whose experts are the decoded weights; small budgets, closed handles, unsupported models."""

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch

import moeoffload
from conftest import cuda_available
from moeoffload.cache import slot_bytes
from moeoffload.errors import ClosedError, TableError
from moeoffload.integrations.hf import NotOffloadedError
from moeoffload.models.adapters import UnsupportedModelError, expert_matrix_names, moe_layers

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                        n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
}


def tiny(family: str, seed: int = 0):
    cfg = transformers.AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                            **FAMILIES[family])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    if family == "gpt_oss":  # biases start at zero: make them count
        for ml in moe_layers(model):
            torch.nn.init.normal_(ml.experts.gate_up_proj_bias, std=0.02)
            torch.nn.init.normal_(ml.experts.down_proj_bias, std=0.02)
    return model.to(torch.bfloat16).eval()


def _prompt(seed=1):
    return torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(seed))


def test_a_table_of_another_layout_is_refused_before_the_model_is_touched():
    """offload() took any table of the model's layer and expert counts, freed the dense experts, and the
    first forward failed (an unfused w1/w2/w3 table: a bare ValueError; another hidden size: a matmul's
    RuntimeError). Names, shapes and, for raw weights, dtypes are checked first now."""
    from moeoffload import table as _table
    from moeoffload.errors import TableMismatchError
    from moeoffload.integrations.hf import _source_state_dict

    model = tiny("mixtral")
    ids = _prompt()
    with torch.no_grad():
        ref = model(ids).logits
    layers = moe_layers(model)
    narrow = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "mixtral", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        **FAMILIES["mixtral"]))
    state = _source_state_dict(layers)
    tables = {
        "another hidden size": _table.build(_source_state_dict(moe_layers(narrow)), 0.3, "szp", progress=False),
        "another dtype (raw)": _table.build({k: v.float() for k, v in state.items()}, codec="none", progress=False),
        "other matrix names": _table.build({k.replace("gate_up_proj", "w13"): v for k, v in state.items()}, 0.3, "szp",
                                           progress=False),
    }
    for what, t in tables.items():
        with pytest.raises(TableMismatchError, match="does not fit this model"):
            moeoffload.offload(model, table=t, gpu_budget=10**8)
    # the fused kernels read [out, in]: a table stored the other way round fits the shapes, not the kernels
    with pytest.raises(TableMismatchError, match="transpose=False"):
        moeoffload.offload(model, table=_table.build(state, 0.3, "szp", transpose=True, progress=False),
                           gpu_budget=10**8)
    oss = tiny("gpt_oss")
    with pytest.raises(TableMismatchError, match="transpose=True"):  # GPT-OSS keeps [in, out]
        moeoffload.offload(oss, table=_table.build(_source_state_dict(moe_layers(oss)), 0.3, "szp", progress=False),
                           gpu_budget=10**8)
    assert not any(getattr(ml.experts, n).is_meta for ml in layers for n in expert_matrix_names(ml.experts))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with moeoffload.offload(model, table=_table.build(state, codec="none", progress=False), gpu_budget=10**8):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)  # its own table fits


def test_decoded_weights_a_gate_the_kernels_do_not_know_reads_must_have_the_models_dtype(monkeypatch):
    # Where the family's own code runs on decoded szp weights (no fused gate), they come out in the table's
    # dtype: a float32-built table on a bf16 model failed in the forward, after the experts were freed.
    from moeoffload import table as _table
    from moeoffload.errors import TableMismatchError
    from moeoffload.integrations import hf

    monkeypatch.setattr(hf, "gate_kind", lambda experts: None)
    model = tiny("mixtral")
    state = hf._source_state_dict(moe_layers(model))
    wide = _table.build({k: v.float() for k, v in state.items()}, 0.3, "szp", progress=False)
    with pytest.raises(TableMismatchError, match="dtypes must agree"):
        moeoffload.offload(model, table=wide, gpu_budget=10**8)
    with moeoffload.offload(model, table=_table.build(state, 0.3, "szp", progress=False), gpu_budget=10**8) as off:
        with torch.no_grad():
            model(_prompt())
        assert off.stats()["fused_layers"] == 0


def test_an_sz3_table_or_codec_is_refused_before_the_model_is_touched(tmp_path):
    """No kernel reads sz3: offload() said so only at the first forward pass, after it had freed the dense
    experts. Now it refuses first, and the model still runs."""
    from moeoffload import table as _table
    from moeoffload.errors import InvalidArgumentError

    model = tiny("mixtral")
    ids = _prompt()
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(InvalidArgumentError, match="'szp', 'szpe' or 'none'.*codec is 'sz3'"):
        moeoffload.offload(model, codec="sz3", gpu_budget=10**8)
    from moeoffload.integrations.hf import _source_state_dict

    layers = moe_layers(model)
    sz3 = _table.build(_source_state_dict(layers), 0.3, "sz3", progress=False)
    with pytest.raises(InvalidArgumentError, match="table is 'sz3'"):
        moeoffload.offload(model, table=sz3, gpu_budget=10**8)
    assert not any(getattr(ml.experts, n).is_meta for ml in layers for n in expert_matrix_names(ml.experts))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_codec_none_is_exact(family):
    model = tiny(family)
    ids = _prompt()
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    dense = sum(getattr(ml.experts, n).numel() * 2 for ml in moe_layers(model) for n in expert_matrix_names(ml.experts))
    params = [weakref.ref(getattr(ml.experts, n)) for ml in moe_layers(model) for n in expert_matrix_names(ml.experts)]
    with moeoffload.offload(model, codec="none", gpu_budget=10**8) as off:
        gc.collect()
        assert all(r() is None for r in params)  # nothing holds the dense expert parameters any more
        assert all(getattr(ml.experts, n).is_meta for ml in moe_layers(model) for n in expert_matrix_names(ml.experts))
        assert off.stats()["expert_bytes_freed"] == dense
        with torch.no_grad():
            got = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        st = off.stats()
    assert torch.equal(got, ref)
    assert torch.equal(tokens, ref_tokens)
    assert st["misses"] > 0 and st["hits"] > 0 and st["tokens"] >= 12 + 5
    assert st["host_pinned"] is True


def _decoded_reference(family, off):
    """The original model with every expert matrix replaced by the table's decoded weights."""
    model = tiny(family)
    for ml in moe_layers(model):
        for name in expert_matrix_names(ml.experts):
            param = getattr(ml.experts, name)
            for e in range(param.shape[0]):
                w = off.table.decompress(ml.index, e, name).float()
                if off.table.matrix_entry(ml.index, e, name).get("transposed"):
                    w = w.T
                param.data[e] = w.to(param.dtype)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_szp_fused_matches_the_decoded_model(family):
    model = tiny(family)
    ids = _prompt()
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget=10**8, prefetch="hidden") as off:
        assert off.stats()["fused_layers"] == len(moe_layers(model))
        with torch.no_grad():
            got = model(ids).logits.float()
        ref_model = _decoded_reference(family, off)
        with torch.no_grad():
            ref = ref_model(ids).logits.float()
            original = tiny(family)(ids).logits.float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    assert (got - original).abs().max() > 0  # the bound is not zero: the weights really are the decoded ones


@pytest.mark.parametrize("family", FAMILIES)
def test_szpe_gives_the_logits_of_szp(family):
    # szpe crosses as entropy-coded bytes and lands as the szp buffers: the fused kernels see the same
    # bytes, so the logits are equal, not close; a budget of two experts makes every layer transcode.
    ids = _prompt(3)
    out = {}
    for codec in ("szp", "szpe"):
        model = tiny(family)
        probe = moeoffload.offload(tiny(family), codec=codec, error_bound=0.1, gpu_budget=10**8, prefetch=None)
        two = 2 * slot_bytes(probe.table)
        probe.close()
        with moeoffload.offload(model, codec=codec, error_bound=0.1, gpu_budget=two, prefetch="hidden") as off:
            with torch.no_grad():
                out[codec] = model(ids).logits
            st = off.stats()
            assert st["fused_layers"] == len(moe_layers(model)) and st["evictions"] > 0
            out[codec + " bits"] = st["bits_per_weight"]
    assert torch.equal(out["szp"], out["szpe"])
    assert out["szpe bits"] < out["szp bits"]


@pytest.mark.parametrize("codec", ["none", "szp"])
def test_a_budget_of_one_expert_still_serves_every_layer(codec):
    model = tiny("mixtral")
    ids = _prompt(3)
    with torch.no_grad():
        ref = model(ids).logits
    probe = moeoffload.offload(tiny("mixtral"), codec=codec, gpu_budget=10**8, prefetch=None)
    one = slot_bytes(probe.table)
    probe.close()
    with moeoffload.offload(model, codec=codec, gpu_budget=one, prefetch=None) as off:
        with torch.no_grad():
            got = model(ids).logits
        assert off.stats()["evictions"] > 0
    if codec == "none":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("prefetch", ["hidden", "activation", "combined", None])
@pytest.mark.parametrize("policy", ["activation", "lru"])
def test_prefetch_sources_and_policies_give_the_same_logits(prefetch, policy):
    model = tiny("qwen3_moe")
    ids = _prompt(4)
    with torch.no_grad():
        ref = model(ids).logits
    with moeoffload.offload(model, codec="none", gpu_budget=10**8, prefetch=prefetch, cache_policy=policy) as off:
        with torch.no_grad():
            got = model(ids).logits
        st = off.stats()
    assert torch.equal(got, ref)
    assert (st["prefetches"] > 0) == (prefetch is not None)


def test_closed_offload_and_unbound_modules_raise_named_errors():
    model = tiny("mixtral")
    ids = _prompt()
    off = moeoffload.offload(model, codec="none", gpu_budget=10**8)
    off.close()
    off.close()
    with pytest.raises(ClosedError):
        with torch.no_grad():
            model(ids)
    other = tiny("mixtral")
    other.set_experts_implementation("moeoffload")  # registered, but this model was never offloaded
    with pytest.raises(NotOffloadedError, match="offload"):
        with torch.no_grad():
            other(ids)


def test_a_dense_model_is_refused():
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, vocab_size=64, intermediate_size=32)
    with pytest.raises(UnsupportedModelError, match="no experts module"):
        moeoffload.offload(transformers.AutoModelForCausalLM.from_config(cfg))


def test_bad_arguments():
    from moeoffload.errors import BudgetError, InvalidArgumentError, UnsupportedDtypeError

    with pytest.raises(InvalidArgumentError, match="prefetch"):
        moeoffload.offload(tiny("mixtral"), prefetch="psychic")
    with pytest.raises(BudgetError):
        moeoffload.offload(tiny("mixtral"), gpu_budget="lots")
    with pytest.raises(UnsupportedDtypeError, match="codec"):
        moeoffload.offload(tiny("mixtral"), codec="zip")
    gc.collect()


def test_what_a_hostile_run_found_is_named(tmp_path):
    """Each was a bare AttributeError, FileExistsError, AssertionError, NotImplementedError or RuntimeError."""
    from moeoffload import table
    from moeoffload.errors import CudaError, InvalidArgumentError
    from moeoffload.integrations.hf import from_pretrained

    with pytest.raises(InvalidArgumentError, match="nn.Module"):
        moeoffload.offload(None)
    with pytest.raises(InvalidArgumentError, match="ExpertTable or a table directory"):
        moeoffload.offload(tiny("mixtral"), table=3)
    # a table directory is taken as from_pretrained takes one, and closed with the Offload
    model, ids = tiny("mixtral"), _prompt()
    with torch.no_grad():
        ref = model(ids).logits
    table.build(model.state_dict(), codec="none", progress=False).save(tmp_path / "t")
    off = moeoffload.offload(model, table=tmp_path / "t", gpu_budget="50%")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # offloading it again (its dense experts are gone, whether or not the Offload is open)
    for _ in range(2):
        with pytest.raises(InvalidArgumentError, match="offloaded already"):
            moeoffload.offload(model)
        off.close()
    assert off.table.closed
    with pytest.raises(InvalidArgumentError, match="meta tensors"):  # experts never loaded
        moeoffload.offload(tiny("mixtral").to("meta"))
    tiny("mixtral").save_pretrained(tmp_path / "ckpt")
    for device, err in (("meta", InvalidArgumentError), ("gpu", InvalidArgumentError)) + (
            (() if torch.cuda.is_available() else (("cuda", CudaError),))):
        with pytest.raises(err, match="device"):
            from_pretrained(tmp_path / "ckpt", device=device)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TableError, match="is a file"):
        from_pretrained(tmp_path / "ckpt", table_dir=tmp_path / "afile")
    with pytest.raises(InvalidArgumentError, match="not both"):
        from_pretrained(tmp_path / "ckpt", table=tmp_path / "t", table_dir=tmp_path / "elsewhere")


def test_a_model_cast_after_offload_reads_its_experts_in_its_new_dtype():
    # codec "none" served the table's bf16 views to a model .half()'d after offload(): a dtype mismatch
    ids = _prompt()
    dense = tiny("mixtral").half()
    with torch.no_grad():
        ref = dense(ids).logits
    model = tiny("mixtral")
    with moeoffload.offload(model, codec="none", gpu_budget="50%"):
        model.half()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)


def test_from_pretrained_names_a_truncated_checkpoint_or_one_its_config_does_not_describe(tmp_path):
    import json
    import shutil

    from moeoffload.integrations.hf import from_pretrained

    tiny("mixtral").save_pretrained(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "short")
    f = tmp_path / "short" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(TableError, match="safetensors"):
        from_pretrained(tmp_path / "short", codec="none")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "vocab")
    cfg = json.loads((tmp_path / "vocab" / "config.json").read_text())
    cfg["vocab_size"] = 130
    (tmp_path / "vocab" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"is \[128, 64\] in the checkpoint and \[130, 64\]"):
        from_pretrained(tmp_path / "vocab", codec="none")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_from_pretrained_never_materialises_the_experts(family, tmp_path):
    from moeoffload.integrations.hf import from_pretrained

    tiny(family).save_pretrained(tmp_path / "ckpt")  # transformers writes its checkpoint layout (legacy keys for Mixtral)
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16,
                                                                 experts_implementation="eager").eval()
    ids = _prompt(5)
    with torch.no_grad():
        ref = original(ids).logits
    model, off = from_pretrained(tmp_path / "ckpt", codec="none", gpu_budget="50%", table_dir=tmp_path / "table")
    with off:
        assert all(getattr(ml.experts, n).is_meta for ml in moe_layers(model) for n in expert_matrix_names(ml.experts))
        assert off.table.mode == "map" and (tmp_path / "table" / "manifest.json").exists()  # streamed to disk
        with torch.no_grad():
            got = model(ids).logits
    assert torch.equal(got, ref)
    # and with a table built before, in szp: the fused path
    model, off = from_pretrained(tmp_path / "ckpt", table=None, codec="szp", error_bound=0.1, gpu_budget="50%")
    with off:
        assert off.stats()["fused_layers"] == len(moe_layers(model))
        with torch.no_grad():
            got = model(ids).logits
    torch.testing.assert_close(got.float(), ref.float(), atol=0.1, rtol=0.1)
    if family == "mixtral":  # a table_dir that holds a table is refused, not overwritten (and then served)
        before = {p.name: p.read_bytes() for p in (tmp_path / "table").iterdir()}
        with pytest.raises(TableError, match="holds a table already"):
            from_pretrained(tmp_path / "ckpt", codec="szp", error_bound=0.1, gpu_budget="50%",
                            table_dir=tmp_path / "table")
        assert {p.name: p.read_bytes() for p in (tmp_path / "table").iterdir()} == before
        model, off = from_pretrained(tmp_path / "ckpt", table=tmp_path / "table", gpu_budget="50%")
        with off, torch.no_grad():
            assert torch.equal(model(ids).logits, ref)


def test_stats_add_up_and_the_budget_holds():
    model = tiny("olmoe")
    ids = _prompt(6)
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="25%") as off:
        model.generate(ids, max_new_tokens=5, do_sample=False)
        st = off.stats()
        sizes = off.table.expert_bytes()
    slot = -(-int(sizes.max()) // 256) * 256  # computed here, not by the code under test
    assert st["hits"] + st["inflight_hits"] + st["misses"] == st["accesses"] > 0
    assert st["peak_used"] <= st["budget"] and st["budget"] == round(0.25 * sizes.size) * slot
    # every fetch moved one expert's payload: demand misses and prefetches, each between the smallest and largest
    fetches = st["misses"] + st["prefetches"]
    assert fetches * int(sizes.min()) <= st["bytes_loaded"] <= fetches * int(sizes.max())


def test_hidden_prefetch_without_a_router_warns_and_falls_back(monkeypatch):
    import moeoffload.integrations.hf as hf

    real = hf.moe_layers

    def routerless(model):  # a family whose layer 1 router moeoffload cannot find
        layers = real(model)
        layers[1].router = None
        return layers

    monkeypatch.setattr(hf, "moe_layers", routerless)
    model = tiny("mixtral")
    ids = _prompt(4)
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.warns(UserWarning, match="no router or norm.*activation history"):
        off = moeoffload.offload(model, codec="none", gpu_budget="50%", prefetch="hidden")
    with off:
        assert off.prefetch == "activation"
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)
        assert off.stats()["prefetch"] == "activation"


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_the_cuda_backend_gives_the_cpu_backends_logits(family):
    # The fused path on the GPU: moe_experts (every routed expert held) and, with a budget of one
    # expert, expert by expert; against the same table on the cpu backend. The hidden-state predictions
    # the decision step is handed (copied to the host in the routing's wait on cuda) are the cpu's too.
    ids = _prompt(6)
    cpu = tiny(family)

    def predictions(off) -> list:
        seen, record = [], off.cache.record
        off.cache.record = lambda layer, experts, hidden_next=None: (seen.append(hidden_next.copy()),
                                                                     record(layer, experts, hidden_next))[1]
        return seen

    with moeoffload.offload(cpu, codec="szp", error_bound=0.1, gpu_budget=10**8, prefetch="hidden") as probe:
        want = predictions(probe)
        with torch.no_grad():
            ref = cpu(ids).logits.float()
    table = probe.table
    for budget in (10**8, slot_bytes(table)):
        model = tiny(family).cuda()
        with moeoffload.offload(model, table=table, gpu_budget=budget, prefetch="hidden") as off:
            seen = predictions(off)
            with torch.no_grad():
                got = model(ids.cuda()).logits.float().cpu()
            assert off.stats()["fused_layers"] == len(moe_layers(model))
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
        assert len(seen) == len(want) and all(p.size == table.experts_per_layer for p in want)
        for p, q in zip(seen, want):
            np.testing.assert_allclose(p, q, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
def test_on_cuda_the_compute_waits_for_late_copies_without_a_host_wait():
    # No host wait for a missed expert on cuda (stalls.py): the compute stream is ordered after the copy.
    # Every copy is made late by a 50 ms sleep kernel queued first on its copy stream, and the model runs
    # on a side stream; expert e's weights are scaled by e + 1, so a read of bytes not yet landed (or of
    # the expert the slot held before) moves the logits by tenths. Codec "none" is the eager view of raw
    # slots (the lru-bf16 baseline), szp the fused paths; the table is built from the cuda model itself.
    ids = _prompt(7).cuda()
    base = tiny("mixtral")
    for ml in moe_layers(base):
        for name in expert_matrix_names(ml.experts):
            p = getattr(ml.experts, name)
            scale = torch.arange(1, p.shape[0] + 1, dtype=torch.float32).view(-1, *[1] * (p.dim() - 1))
            p.data = (p.data.float() * scale).to(p.dtype)
    with torch.no_grad():
        want = {"none": copy.deepcopy(base).cuda()(ids).logits.float()}  # the resident model
    one = {}
    for codec in ("none", "szp"):  # a budget of one expert, and the cpu backend's szp logits
        with moeoffload.offload(copy.deepcopy(base), codec=codec, gpu_budget=10**8, prefetch=None) as probe:
            one[codec] = slot_bytes(probe.table)
            if codec == "szp":
                with torch.no_grad():
                    want["szp"] = probe.model(ids.cpu()).logits.float().cuda()
    for codec in ("none", "szp"):
        for budget in (10**8, one[codec]):
            model = copy.deepcopy(base).cuda()
            with moeoffload.offload(model, codec=codec, gpu_budget=budget, prefetch="activation") as off:
                eng = off.cache.engine
                side = torch.cuda.Stream()
                with torch.no_grad(), torch.cuda.stream(side):
                    for i in range(eng.num_streams):
                        with torch.cuda.stream(torch.cuda.ExternalStream(eng.cuda_stream(i))):
                            torch.cuda._sleep(100_000_000)  # about 50 ms at 2 GHz
                    got = model(ids).logits.float()
                torch.cuda.synchronize()
                st = off.stats()
            torch.testing.assert_close(got, want[codec], atol=3e-2, rtol=3e-2)
            assert st["misses"] > 0
            if budget == 10**8:  # every copy queued at once behind the sleep: the first layer stalled on it
                assert st["stall_s"] > 0.01


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_the_model_compiles_into_one_graph_around_its_moe_layers(family):
    # experts_forward is one opaque op under torch.compile (moeoffload::offload_experts): fullgraph=True
    # fails on any graph break; the compiled model gives the eager offload's logits and serves the
    # same cache.
    if family not in FAMILIES:
        pytest.skip(f"{family} is not among this transformers' test families")
    import torch._dynamo

    ids = _prompt(3)
    eager = tiny(family)
    with moeoffload.offload(eager, codec="szp", error_bound=0.1, gpu_budget="50%", prefetch="activation") as off:
        with torch.no_grad():
            want = eager(ids).logits
    compiled = tiny(family)
    torch._dynamo.reset()
    with moeoffload.offload(compiled, table=off.table, gpu_budget="50%", prefetch="hidden") as off2:
        fwd = torch.compile(compiled.forward, backend="aot_eager", fullgraph=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # plain RMSNorms: the hidden-state prediction needs no hook
            got = fwd(ids).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        with torch.no_grad():
            again = fwd(_prompt(4)).logits  # no recompile needed for new values; the op runs again
        assert again.shape == got.shape and off2.stats()["accesses"] > 0
    with torch.no_grad(), pytest.raises(ClosedError):
        fwd(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_next_router_scores_the_experts_input(family):
    # With plain RMSNorms in front of both routers, the next layer's router folded by g_next / g_this
    # scores this layer's experts' input as it scores the residual stream through its own norm.
    from moeoffload.models.adapters import next_router_on_input, router_probabilities, router_scores

    model = tiny(family)
    layers = moe_layers(model)
    g = torch.Generator().manual_seed(2)
    for ml in layers:  # norm scales of ones would hide a wrong fold
        ml.norm.weight.data.copy_(torch.rand(ml.norm.weight.shape, generator=g) * 1.5 + 0.5)
    residual, inputs = {}, {}

    def keep(into, layer):
        def hook(mod, args):
            into.setdefault(layer, args[0])  # the first call: the forward below
        return hook

    hooks = [ml.norm.register_forward_pre_hook(keep(residual, ml.index)) for ml in layers if ml.norm is not None]
    hooks += [ml.experts.register_forward_pre_hook(keep(inputs, ml.index)) for ml in layers]
    with torch.no_grad():
        model(_prompt(5))
    for h in hooks:
        h.remove()
    for ml in layers:
        nxt = layers[(ml.index + 1) % len(layers)]
        folded = next_router_on_input(ml, nxt)
        plain = all("RMSNorm" in type(m.norm).__name__ for m in (ml, nxt))  # PhiMoE's are LayerNorms
        assert (folded is not None) == plain, (family, type(ml.norm).__name__)
        if folded is None:
            continue
        with torch.no_grad():
            want = router_probabilities(nxt, residual[ml.index])
            got = router_scores(inputs[ml.index], folded)
        torch.testing.assert_close(got, want, atol=0.02, rtol=0.05)


def test_a_non_finite_hidden_state_predicts_nothing_and_the_forward_goes_on():
    # The decision step refuses non-finite probabilities; an overflowed hidden state must not stop a forward.
    model = tiny("qwen3_moe")
    ids = _prompt(2)
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="50%", prefetch="hidden") as off:
        E = off.table.experts_per_layer
        bad = torch.full((1, model.config.hidden_size), float("inf"), dtype=torch.bfloat16)
        predict = lambda h: off._hidden_next(off._next_scores(0, h))  # noqa: E731
        assert predict(bad).size == 0 and predict(torch.zeros_like(bad)).size == E
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight[0] = float("inf")  # inf into every router
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_a_forward_with_grad_enabled_predicts_too():
    # The folded prediction read a hidden state that requires grad into numpy (a RuntimeError at the
    # default prefetch="hidden"); outside no_grad the offload gives the logits it gives inside.
    model = tiny("qwen3_moe")
    ids = _prompt(6)
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="50%") as off:
        assert off.prefetch == "hidden"
        with torch.no_grad():
            want = model(ids).logits
        torch.testing.assert_close(model(ids).logits.detach(), want, atol=0, rtol=0)


def test_a_non_finite_norm_scale_is_not_folded_and_the_op_names_bad_keys():
    from moeoffload.errors import InvalidArgumentError
    from moeoffload.models.adapters import next_router_on_input, rms_scale

    model = tiny("qwen3_moe")
    layers = moe_layers(model)
    assert rms_scale(layers[1].norm) is not None and next_router_on_input(layers[0], layers[1]) is not None
    with torch.no_grad():
        layers[1].norm.weight[0] = float("nan")
    assert rms_scale(layers[1].norm) is None and next_router_on_input(layers[0], layers[1]) is None
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="50%") as off:  # was a torch error
        with torch.no_grad():
            model(_prompt(1))
        h, idx, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
        with pytest.raises(InvalidArgumentError, match="no offload has key"):
            torch.ops.moeoffload.offload_experts(h, idx, w, 10**9, 0)
        with pytest.raises(InvalidArgumentError, match="not one of"):
            torch.ops.moeoffload.offload_experts(h, idx, w, off.key, 99)


@pytest.mark.parametrize("codec,one_slot", [("none", False), ("szp", False), ("szp", True)])
def test_every_path_refuses_an_expert_routed_twice_for_a_token(codec, one_slot):
    # moe_experts (the fused layer) refused it; the eager path (codec "none") and the expert-by-expert
    # path (a budget of one slot) summed both; now each names it the same way.
    from moeoffload.errors import InvalidArgumentError

    kw = {} if codec == "none" else {"error_bound": 0.1}
    budget = "50%"
    if one_slot:
        probe = moeoffload.offload(tiny("qwen3_moe"), codec=codec, gpu_budget=10**8, prefetch=None, **kw)
        budget = slot_bytes(probe.table)
        probe.close()
    model = tiny("qwen3_moe")
    with moeoffload.offload(model, codec=codec, gpu_budget=budget, prefetch=None, **kw) as off, torch.no_grad():
        model(_prompt(1))
        h, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.ones(2, 2)
        with pytest.raises(InvalidArgumentError, match="expert 1 is routed twice for token 1"):
            torch.ops.moeoffload.offload_experts(h, torch.tensor([[0, 1], [1, 1]]), w, off.key, 0)
        y = torch.ops.moeoffload.offload_experts(h, torch.tensor([[0, 1], [1, 2]]), w, off.key, 0)
        assert y.shape == h.shape  # and the offload still serves


def test_a_post_norm_layer_has_no_router_norm():
    # FlexOlmo normalises the attention's output before the residual add: its MLP reads the raw residual
    # stream, so no norm stands in front of its router and the hidden-state prediction does not apply.
    cfg = transformers.AutoConfig.for_model("flex_olmo", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=128, num_experts=4,
                                            num_experts_per_tok=2, intermediate_size=32, pad_token_id=0,
                                            eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    assert [ml.norm for ml in moe_layers(model)] == [None, None]
    assert all(moe_layers(tiny(f))[0].norm is not None for f in FAMILIES)  # the pre-norm families keep theirs
    with pytest.warns(UserWarning, match="no router or norm"):
        off = moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="50%", prefetch="hidden")
    with off, torch.no_grad():
        assert off.prefetch == "activation"
        model(_prompt(2))


def test_a_batch_decode_step_does_not_start_a_sequence():
    # A decode step of a batch of two carries two tokens; only a forward on an empty KV cache starts a
    # sequence (it began one at every step, adding a one-token activation matrix to the history each time).
    model = tiny("qwen3_moe")
    ids = torch.cat([_prompt(1), _prompt(2)])
    with moeoffload.offload(model, codec="szp", error_bound=0.1, gpu_budget="50%", prefetch="activation") as off:
        begun = []
        start = off.cache.begin_sequence
        off.cache.begin_sequence = lambda: (begun.append(1), start())[1]
        with torch.no_grad():
            model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert len(begun) == 1
            model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static")
            assert len(begun) == 2
            model(ids)  # no cache: a sequence of its own
            model(ids[:, :1])
            assert len(begun) == 4
