"""The fused ops (python/moeoffload/ops.py over cpp/kernels): against the decode + dense reference on
fresh random inputs, every dtype, T = 1..64, ragged shapes, exceptions; opcheck; torch.compile; bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, cuda_available

from moeoffload import CudaError, ShapeError, UnsupportedDtypeError, codec, ops
from moeoffload.errors import InvalidArgumentError

# (out, in): ragged last blocks, out not a multiple of any tile, 1-row and 1-column matrices
SHAPES = [(96, 70), (1, 1), (1, 257), (257, 1), (13, 33), (130, 512)]
TOKENS = [1, 2, 3, 5, 8, 13, 64]


def _tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


_UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative
_TINY = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}  # half a subnormal step


def _assert_within_rounding(y, x, ct):
    """|y - x·Ŵᵀ| within what the roundings allow, element by element: the kernel multiplies q·step
    unrounded where Ŵ is rounded to the weight dtype (half an ulp of each |w|), accumulates
    in float32 (n units of float32 on Σ|x||w|), and rounds y to its dtype (half an ulp of |y|, and at
    least half the subnormal step: an fp16 y below 6e-5 rounds on a fixed 2^-24 grid).
    Bounds on Σ|x||w|, not on |y|: a dot product that cancels to near zero is still checked fairly."""
    w = ct.decompress(dtype=torch.float32).double()
    ref = x.double() @ w.T
    absdot = x.double().abs() @ w.abs().T
    n = w.shape[1]
    bound = (_UNIT[ct.dtype] + n * 2.0**-24) * absdot + _UNIT[y.dtype] * ref.abs() + _TINY[y.dtype]
    err = (y.double() - ref).abs()
    assert bool((err <= 2 * bound).all()), float((err / bound).max())


def _weights_fp32(shape, dtype, seed, exceptions=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    if exceptions and dtype != torch.float32:
        w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
        eb = 0.02 * 0.02  # a round bound lines up with the bf16/fp16 grid: some values stay exact
    else:
        eb = 0.02 * 0.1
    return w, eb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_szp_linear_matches_reference(dtype, shape):
    w, eb = _weights_fp32(shape, dtype, seed=hash(shape) % 1000)
    ct = codec.compress(w, eb)
    for T in TOKENS:
        x = torch.randn(T, shape[1]).to(dtype)
        y = ops.szp_linear(x, ct)
        assert y.dtype == dtype and y.shape == (T, shape[0])
        _assert_within_rounding(y, x, ct)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_szp_linear_with_exceptions(dtype):
    torch.manual_seed(3)
    if dtype == torch.bfloat16:
        w = (torch.randn(257, 300) * 0.02).to(dtype)
        ct = codec.compress(w, 0.02 * 0.02)  # a round bound on the bf16 grid: some values stay exact
    else:
        w = (torch.randn(257, 300) * 3000).to(dtype)
        w[0, 5], w[9, 299], w[256, 0] = 65504, -65504, 65504  # no q*step within eb is a finite half
        ct = codec.compress(w, 20000.0)
    assert ct.n_exceptions > 0
    x = (torch.randn(7, 300) * (1.0 if dtype == torch.bfloat16 else 1e-3)).to(dtype)  # no fp16 overflow
    y = ops.szp_linear(x, ct)
    _assert_within_rounding(y, x, ct)
    # and the weights used are within the bound of the originals
    assert (ct.decompress(dtype=torch.float32).double() - w.double()).abs().max().item() <= ct.eb


def test_fused_weights_are_within_the_bound_before_rounding():
    # The fused product uses q*step unrounded; the encoder keeps that within eb too.
    from moeoffload import _native

    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(64, 512) * torch.logspace(-3, 0, 512)).to(dtype)
        ct = codec.compress(w, 1e-3)
        step = np.float32(_native.szp_inspect(ct.buffer)["step"])
        # rebuild q from the decoded values (exact for non-exceptions) via the identity matrix
        eye = torch.eye(512, dtype=torch.float32)
        cols = ops.szp_linear(eye, ct)  # [512, 64] = (q*step)^T in float32
        assert (cols.T.double() - w.double()).abs().max().item() <= ct.eb * (1 + 1e-6)
        assert step > 0


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_simd_path_gives_the_same_product(isa):
    script = (
        "import torch; from moeoffload import codec, ops\n"
        "g = torch.Generator().manual_seed(5)\n"
        "w = (torch.randn(200, 900, generator=g) * torch.logspace(-4, 0, 900)).to(torch.bfloat16)\n"
        "out = []\n"
        "for eb in (1e-6, 1e-4, 1e-2):\n"
        "    ct = codec.compress(w, eb)\n"
        "    x = torch.randn(9, 900, generator=g)\n"
        "    out.append(ops.szp_linear(x, ct))\n"
        "torch.save(out, __import__('sys').argv[1])\n"
    )
    outs = {}
    for name in (isa, "avx512"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"moeoffload-simd-{os.getpid()}-{name}.pt")
        env = {**os.environ, "MOEOFFLOAD_ISA": name}
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        outs[name] = torch.load(path)
        os.unlink(path)
    for a, b in zip(outs[isa], outs["avx512"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_dense_above_crossover_and_direct_paths_agree():
    w = (torch.randn(64, 96) * 0.02).to(torch.bfloat16)
    ct = codec.compress(w, 0.002)
    x = torch.randn(20, 96).to(torch.bfloat16)
    fused = ops.szp_linear(x, ct).float()
    dense = ops.szp_linear(x, ct, dense_above=4).float()
    direct = ops.szp_linear(x, ct, direct=True).float()
    torch.testing.assert_close(fused, direct)
    torch.testing.assert_close(fused, dense, rtol=3e-2, atol=3e-2)


def test_leading_dims_and_bias():
    w = (torch.randn(40, 32) * 0.1)
    ct = codec.compress(w, 1e-3)
    x = torch.randn(2, 3, 32)
    b = torch.randn(40)
    y = ops.szp_linear(x, ct, b)
    torch.testing.assert_close(y, F.linear(x, ct.decompress(), b), rtol=1e-4, atol=1e-4)


# ---- expert_mlp ---------------------------------------------------------------------------------


def _expert(H, I, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    gu = codec.compress((torch.randn(2 * I, H, generator=g) * 0.05).to(dtype), 0.005)
    dn = codec.compress((torch.randn(H, I, generator=g) * 0.05).to(dtype), 0.005)
    gb = (torch.randn(2 * I, generator=g) * 0.1).to(dtype) if bias else None
    db = (torch.randn(H, generator=g) * 0.1).to(dtype) if bias else None
    return gu, dn, gb, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,layout,bias", [("silu", "concatenated", False), ("gelu", "concatenated", True),
                                             ("gelu_tanh", "interleaved", False), ("relu", "concatenated", True),
                                             ("gptoss", "interleaved", True)])
def test_expert_mlp_matches_reference(dtype, act, layout, bias):
    H, I = 70, 45
    gu, dn, gb, db = _expert(H, I, dtype, seed=len(act), bias=bias)
    for T in (1, 3, 17):
        x = torch.randn(T, H).to(dtype)
        kw = dict(act=act, layout=layout, gate_up_bias=gb, down_bias=db, alpha=1.702, limit=0.5)
        y = ops.expert_mlp(x, gu, dn, **kw)
        ref = ops.expert_mlp_reference(x, gu, dn, **kw)
        assert y.dtype == dtype and y.shape == (T, H)
        torch.testing.assert_close(y.float(), ref.float(), rtol=_tol(dtype) * 2, atol=_tol(dtype) * 2 *
                                   ref.float().abs().max().item())


def test_a_meta_tensor_beside_a_real_x_and_bad_ids_are_refused():
    """A meta tensor among a call's tensors makes the dispatcher run the fake kernel, which would hand
    back uninitialised memory for a real x: each entry refuses it by name (the direct path too)."""
    H, I = 32, 16
    gu, dn, gb, db = _expert(H, I, torch.float32, seed=1, bias=True)
    x = torch.randn(3, H)
    meta_db = torch.zeros(H, device="meta")
    with pytest.raises(InvalidArgumentError, match="down_bias is on the meta device"):
        ops.expert_mlp(x, gu, dn, down_bias=meta_db)
    gh, ge = ops.matrix_handle(gu)
    dh, de = ops.matrix_handle(dn)
    with pytest.raises(InvalidArgumentError, match="gate_up_bias is on the meta device"):
        torch.ops.moeoffload.expert_mlp(x, gh, ge, 0, dh, de, 0, torch.zeros(2 * I, device="meta"), None, "silu", 0,
                                        1.702, 7.0)
    experts = [(gu, dn), _expert(H, I, torch.float32, seed=2)[:2]]
    idx, w = torch.tensor([[0], [1], [0]]), torch.rand(3, 1)
    for grad in (True, False):  # the dispatcher, and the direct path of inference
        with torch.set_grad_enabled(grad), pytest.raises(InvalidArgumentError, match="top_k_weights is on the meta"):
            ops.moe_experts(x, idx, w.to("meta"), experts)
    with pytest.raises(InvalidArgumentError, match="down_bias is on the meta"):
        ops.moe_experts(x, idx, w, experts, down_bias=torch.zeros(2, H, device="meta"))
    with pytest.raises(InvalidArgumentError, match="ids are integers in \\[0, 2\\^32\\)"):
        torch.ops.moeoffload.szp_linear(x, gh, -1, 0)
    with pytest.raises(ShapeError, match=r"\[tokens, in\]"):
        torch.ops.moeoffload.szp_linear(x[0, 0], gh, ge, 0)
    ref = ops.expert_mlp(x, gu, dn, gate_up_bias=gb, down_bias=db)  # a meta x still traces
    assert ops.expert_mlp(x.to("meta"), gu, dn, gate_up_bias=gb.to("meta"), down_bias=db.to("meta")).shape == ref.shape


# ---- moe_experts ---------------------------------------------------------------------------------


def _eager_layer(x, top_k_index, top_k_weights, experts, gb, db, **kw):
    """transformers' eager experts loop on the fused expert: expert by expert ascending, multiply, cast, index_add_."""
    out = torch.zeros_like(x)
    for e in top_k_index.unique().tolist():
        t, pos = torch.where(top_k_index == e)
        y = ops.expert_mlp(x[t], *experts[e], gate_up_bias=None if gb is None else gb[e],
                           down_bias=None if db is None else db[e], **kw)
        out.index_add_(0, t, (y * top_k_weights[t, pos, None]).to(x.dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,layout,bias", [("silu", "concatenated", False), ("gptoss", "interleaved", True)])
def test_moe_experts_gives_the_eager_loop_bit_for_bit(dtype, act, layout, bias):
    H, I, E, k = 48, 40, 6, 2
    g = torch.Generator().manual_seed(3)
    experts = [_expert(H, I, dtype, seed=10 + e)[:2] for e in range(E)]
    gb = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if bias else None
    db = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if bias else None
    kw = dict(act=act, layout=layout, alpha=1.702, limit=0.5)
    for T in (1, 2, 9):  # one token (x used as it is), and tokens spread over the experts (rows gathered)
        x = torch.randn(T, H, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        for w in (torch.rand(T, k, generator=g), torch.rand(T, k, generator=g).to(dtype)):
            y = ops.moe_experts(x, idx, w, experts, gate_up_bias=gb, down_bias=db, **kw)
            assert y.dtype == dtype and y.shape == (T, H)
            assert torch.equal(y, _eager_layer(x, idx, w, experts, gb, db, **kw))


def test_moe_experts_skips_the_dispatcher_only_for_inference():
    # With autograd on, the op (no backward) says so; the direct path would hand back a constant.
    experts = [_expert(16, 8, torch.float32, seed=e)[:2] for e in range(2)]
    x, idx, w = torch.randn(2, 16, requires_grad=True), torch.tensor([[0], [1]]), torch.rand(2, 1)
    with pytest.raises(RuntimeError):
        ops.moe_experts(x, idx, w, experts).sum().backward()
    with torch.no_grad():
        assert torch.equal(ops.moe_experts(x, idx, w, experts), ops.moe_experts(x.detach(), idx, w, experts))


def test_moe_experts_refuses_bad_routing_and_shapes():
    experts = [_expert(16, 8, torch.float32, seed=e)[:2] for e in range(3)]
    x, w = torch.randn(2, 16), torch.rand(2, 2)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        ops.moe_experts(x, torch.tensor([[0, 3], [1, 2]]), w, experts)
    with pytest.raises(InvalidArgumentError, match="routed twice"):
        ops.moe_experts(x, torch.tensor([[0, 1], [2, 2]]), w, experts)
    with pytest.raises(ShapeError):
        ops.moe_experts(torch.randn(3, 16), torch.tensor([[0, 1], [1, 2]]), w, experts)  # 3 tokens, 2 routed
    with pytest.raises(ShapeError):
        ops.moe_experts(torch.randn(2, 15), torch.tensor([[0, 1], [1, 2]]), w, experts)  # hidden size
    with pytest.raises(ShapeError):
        ops.moe_experts(x, torch.tensor([[0, 1], [1, 2]]), w, experts, gate_up_bias=torch.randn(3, 15))
    with pytest.raises(ShapeError):
        ops.moe_experts(x, torch.tensor([[0, 1], [1, 2]]), w, [])
    # whether or not tokens route to them: no tokens, or an expert no token routes to
    empty = torch.zeros(0, 2, dtype=torch.int64)
    with pytest.raises(ShapeError, match="expert 0 is not"):
        ops.moe_experts(torch.randn(0, 15), empty, torch.zeros(0, 2), experts)
    with pytest.raises(ShapeError, match="expert 2 is not"):
        ops.moe_experts(x, torch.tensor([[0, 1], [1, 0]]), w, [*experts[:2], _expert(16, 4, torch.float32, seed=9)[:2]])
    assert ops.moe_experts(torch.randn(0, 16), empty, torch.zeros(0, 2), experts).shape == (0, 16)


def test_expert_mlp_reads_gate_up_and_down_from_two_sources():
    # Two sources' read locks are taken without holding one while waiting for the other (lock_both: fork
    # takes them exclusively one after another).
    from moeoffload import _native

    gu, dn, _, _ = _expert(32, 16, torch.float32, seed=7)
    sources = []
    for ct in (gu, dn):
        h = _native.HostMatrices()
        sources.append((h, h.register(), h.add(ct.buffer)))
    x = torch.randn(3, 32)
    y = torch.empty(3, 32)
    (_, gh, ge), (_, dh, de) = sources
    _native.expert_mlp(gh, ge, 0, dh, de, 0, x, "silu", 0, 1.702, 7.0, None, None, y, None, 0)
    assert torch.equal(y, ops.expert_mlp(x, gu, dn))


def test_moe_experts_hostile_inputs_are_named_or_computed_right():
    """What a hostile run found: a non-contiguous bias was read after its converted copy was freed (garbage,
    or a crash); float routing was truncated to expert ids; an output the raw binding had to convert took
    the result into a copy that was dropped."""
    from moeoffload import _native

    H, I, E = 32, 16, 4
    experts = [_expert(H, I, torch.float32, seed=20 + e)[:2] for e in range(E)]
    x, idx, w = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)
    db = torch.randn(H, E).t()  # [E, H], not contiguous
    gb = torch.randn(2 * I, E).t()
    assert not db.is_contiguous()
    want = ops.moe_experts(x, idx, w, experts, gate_up_bias=gb.contiguous(), down_bias=db.contiguous())
    for _ in range(20):
        assert torch.equal(ops.moe_experts(x, idx, w, experts, gate_up_bias=gb, down_bias=db), want)
    strided = torch.randn(2 * H)[::2]
    assert torch.equal(ops.expert_mlp(x, *experts[0], down_bias=strided),
                       ops.expert_mlp(x, *experts[0], down_bias=strided.contiguous()))
    for bad in (idx.float() + 0.7, idx.bool()):
        with pytest.raises(UnsupportedDtypeError, match="routing"):
            ops.moe_experts(x, bad, w, experts)
    with pytest.raises(ShapeError, match="at least one expert"):
        ops.moe_experts(x, torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, 0), experts)
    with pytest.raises(UnsupportedDtypeError):
        ops.moe_experts(x, idx, w, experts, down_bias=[0.0] * H)
    with pytest.raises(UnsupportedDtypeError):
        ops.moe_experts(x.numpy(), idx, w, experts)
    with pytest.raises(ShapeError):
        ops.moe_experts(x, idx, w, [experts[0][0]] * E)  # not pairs
    # the raw binding: an output it would have to convert is refused, never written into a dropped copy
    gu, dn = ([ops.matrix_handle(p[i])[1] for p in experts] for i in (0, 1))
    out = torch.zeros(H, 3).t()
    with pytest.raises(TypeError):
        _native.moe_experts(ops.matrix_handle(experts[0][0])[0], gu, 0, dn, 0, x, idx.numpy(), w, "silu", 0, 1.702,
                            7.0, None, None, out, None, 0)
    with pytest.raises(TypeError):
        _native.expert_mlp(*ops.matrix_handle(experts[0][0]), 0, *ops.matrix_handle(experts[0][1]), 0, x, "silu", 0,
                           1.702, 7.0, None, None, out, None, 0)


# ---- the ops on a runtime's experts, each backend against the cpu one -------------------------------


def _held_experts(dtype, policy, backend, E, H, I):
    """A one-layer table of E random experts (exceptions at small bounds) and an ExpertCache on `backend`
    holding all of them: (cache, flat ids, gate_up index, down index)."""
    from moeoffload import table
    from moeoffload.cache import ExpertCache

    g = torch.Generator().manual_seed(7)
    sd = {"model.layers.0.mlp.experts.gate_up_proj": (0.05 * torch.randn(E, 2 * I, H, generator=g)).to(dtype),
          "model.layers.0.mlp.experts.down_proj": (0.05 * torch.randn(E, H, I, generator=g)).to(dtype)}
    t = table.build(sd, policy=policy, mode="meanabs", progress=False)
    cache = ExpertCache(t, 10**8, prefetch=None, backend=backend)
    for slot in cache.acquire_ahead(0, list(range(E))):
        slot.wait()
    return cache, [cache.expert_id(0, e) for e in range(E)], t.matrix_names.index("gate_up_proj"), \
        t.matrix_names.index("down_proj")


def _kernels_agree_with_the_cpu(backend, dtype, policy):
    """szp_linear, expert_mlp and moe_experts on `backend`'s device against the cpu backend on the same
    table, fresh random inputs; and moe_experts against the eager loop of expert_mlp on that device,
    bit for bit (the same kernels, the same rounding of each term and sum)."""
    E, H, I, k = 6, 70, 45, 2  # ragged blocks in both projections
    dev = "cuda" if backend == "cuda" else "cpu"
    ref_cache, ids, gu, dn = _held_experts(dtype, policy, "cpu", E, H, I)
    cache, _, _, _ = _held_experts(dtype, policy, backend, E, H, I)
    g = torch.Generator().manual_seed(11)
    gb, db = ((torch.randn(E, n, generator=g) * 0.1).to(dtype) for n in (2 * I, H))
    tol = _tol(dtype) * 2
    try:
        for T in (1, 3, 9, 64, 256):
            x = torch.randn(T, H, generator=g).to(dtype)
            for e in (0, E - 1):
                got = torch.ops.moeoffload.szp_linear(x.to(dev), cache.handle, ids[e], gu).cpu()
                want = torch.ops.moeoffload.szp_linear(x, ref_cache.handle, ids[e], gu)
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max())
            for act, layout, bias in (("silu", 0, False), ("gptoss", 1, True), ("gelu", 0, True)):
                b = (gb, db) if bias else (None, None)
                on = tuple(None if v is None else v.to(dev) for v in b)
                gate = (act, layout, 1.702, 0.5)
                got = torch.ops.moeoffload.expert_mlp(x.to(dev), cache.handle, ids[2], gu, cache.handle, ids[2], dn,
                                                      *(None if v is None else v[2] for v in on), *gate).cpu()
                want = torch.ops.moeoffload.expert_mlp(x, ref_cache.handle, ids[2], gu, ref_cache.handle, ids[2], dn,
                                                       *(None if v is None else v[2] for v in b), *gate)
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max())
                if T * k > ops.MAX_CUDA_ASSIGNMENTS:
                    continue
                idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
                w = torch.rand(T, k, generator=g)
                got = ops.moe_experts_call(x.to(dev), idx, w.to(dev), cache.handle, ids, gu, ids, dn, *on, *gate)
                want = ops.moe_experts_call(x, idx, w, ref_cache.handle, ids, gu, ids, dn, *b, *gate)
                torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol,
                                           atol=tol * want.float().abs().max())
                eager = torch.zeros(T, H, dtype=dtype, device=dev)
                xd, wd = x.to(dev), w.to(dev)
                for e in idx.unique().tolist():
                    t, pos = (v.to(dev) for v in torch.where(idx == e))
                    y = torch.ops.moeoffload.expert_mlp(xd[t], cache.handle, ids[e], gu, cache.handle, ids[e], dn,
                                                        *(None if v is None else v[e] for v in on), *gate)
                    eager.index_add_(0, t, (y * wd[t, pos, None]).to(dtype))
                assert torch.equal(got, eager)
        # a NaN stays a NaN in every dtype (a GPU's NaN, 0x7FFFFFFF, once rounded to bfloat16 as -0)
        x = torch.randn(3, H, generator=g).to(dtype)
        x[1, 0] = float("nan")
        idx, w = torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.rand(3, k, generator=g)
        for got in (torch.ops.moeoffload.expert_mlp(x.to(dev), cache.handle, ids[0], gu, cache.handle, ids[0], dn,
                                                    None, None, "silu", 0, 1.702, 7.0),
                    ops.moe_experts_call(x.to(dev), idx, w.to(dev), cache.handle, ids, gu, ids, dn, None, None, "silu",
                                         0, 1.702, 7.0)):
            nan = got.cpu().float().isnan()
            assert bool(nan[1].all()) and not bool(nan[0].any() or nan[2].any())
    finally:
        cache.close()
        ref_cache.close()


@pytest.mark.parametrize("dtype,policy", [(torch.float32, 0.05), (torch.bfloat16, 0.01), (torch.float16, 0.05)])
def test_ops_on_runtime_experts_agree_with_the_standalone_path(dtype, policy):
    # On this machine the harness of the CUDA test below runs on the cpu backend: the runtime's matrices
    # through every op, and moe_experts against the eager loop bit for bit.
    _kernels_agree_with_the_cpu("cpu", dtype, policy)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype,policy", [(torch.float32, 0.05), (torch.bfloat16, 0.01), (torch.float16, 0.05)])
def test_the_cuda_kernels_give_the_cpu_kernels_results(dtype, policy):
    # the grouped szp linear (one matrix, and a layer's experts through row maps), the gated staging of
    # the down projection, the biases, the exceptions (bf16 at 0.01 has thousands), T = 1 (a decode step,
    # tiles of one row) to 256 (more tiles than one member has)
    _kernels_agree_with_the_cpu("cuda", dtype, policy)


def test_removing_a_matrix_while_another_thread_computes_never_deadlocks():
    # A CompressedTensor's finalizer removes its matrix (taking the registry's write lock) with the GIL held;
    # an op in another thread held a read lock until it had the GIL back. Run apart: a deadlock would hang.
    code = """if True:
        import threading, time, faulthandler, torch
        from moeoffload import codec, ops
        faulthandler.dump_traceback_later(50, exit=True)
        experts = [(codec.compress(torch.randn(64, 32) * .05, .01), codec.compress(torch.randn(32, 32) * .05, .01))
                   for _ in range(4)]
        x, r, w = torch.randn(64, 32), torch.stack([torch.randperm(4)[:2] for _ in range(64)]), torch.rand(64, 2)
        stop = []
        def work():
            while not stop:
                ops.moe_experts(x, r, w, experts)
                ops.expert_mlp(x, *experts[0])
        t = threading.Thread(target=work); t.start()
        end = time.time() + 3
        while time.time() < end:
            ct = codec.compress(torch.randn(4, 4), 0.1); ops.matrix_handle(ct); del ct
        stop.append(1); t.join()
        print("done")
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr[-2000:]


def test_a_tensor_met_first_by_several_threads_is_registered_once(monkeypatch):
    # HostMatrices.add releases the GIL: four threads meeting one tensor each added it, and the copies
    # of all but the last stayed for the life of the process. A slow add makes the window certain.
    import threading
    import time

    ops.matrix_handle(codec.compress(torch.randn(2, 2), 0.1))  # the registry exists

    class SlowHost:
        def __init__(self, host):
            self._host = host

        def add(self, buf):
            time.sleep(0.05)  # (the GIL is free meanwhile, as in the native add)
            return self._host.add(buf)

        def remove(self, i):
            return self._host.remove(i)

    monkeypatch.setattr(ops, "_host", SlowHost(ops._host))
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    barrier, ids = threading.Barrier(4), []
    def first_use():
        barrier.wait()
        ids.append(ops.matrix_handle(ct))
    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 4


def test_expert_mlp_transposed_is_the_dense_variant():
    H, I = 32, 24
    g = torch.Generator().manual_seed(1)
    gu_t = codec.compress(torch.randn(H, 2 * I, generator=g) * 0.05, 1e-4)  # [H, 2I] as GPT-OSS stores it
    dn_t = codec.compress(torch.randn(I, H, generator=g) * 0.05, 1e-4)
    x = torch.randn(4, H)
    y = ops.expert_mlp(x, gu_t, dn_t, transposed=True, act="gptoss", layout="interleaved")
    gate, up = (x @ gu_t.decompress())[..., ::2], (x @ gu_t.decompress())[..., 1::2]
    gate = gate.clamp(max=7.0)
    up = up.clamp(-7.0, 7.0)
    ref = ((up + 1) * gate * torch.sigmoid(gate * 1.702)) @ dn_t.decompress()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


# ---- custom op machinery ------------------------------------------------------------------------


def test_opcheck():
    w = codec.compress(torch.randn(24, 40) * 0.1, 1e-3)
    handle, expert = ops.matrix_handle(w)
    x = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.moeoffload.szp_linear.default, (x, handle, expert, 0))
    gu, dn, gb, db = _expert(40, 16, torch.float32, seed=2, bias=True)
    gh, ge = ops.matrix_handle(gu)
    dh, de = ops.matrix_handle(dn)
    torch.library.opcheck(torch.ops.moeoffload.expert_mlp.default,
                          (x, gh, ge, 0, dh, de, 0, gb, db, "silu", 0, 1.702, 7.0))
    torch.library.opcheck(torch.ops.moeoffload.szp_decode.default, (handle, expert, 0, torch.device("cpu")))
    experts = [_expert(40, 16, torch.float32, seed=s)[:2] for s in (5, 6, 7)]
    ids = [[ops.matrix_handle(m)[1] for m in pair] for pair in experts]
    torch.library.opcheck(torch.ops.moeoffload.moe_experts.default,
                          (x, torch.tensor([[0, 2], [1, 2], [2, 0]]), torch.rand(3, 2), ops.matrix_handle(experts[0][0])[0],
                           [a for a, _ in ids], 0, [b for _, b in ids], 0, None, None, "silu", 0, 1.702, 7.0))
    torch.testing.assert_close(torch.ops.moeoffload.szp_decode(handle, expert, 0, torch.device("cpu")), w.decompress())


def test_torch_compile_fullgraph_smoke():
    w = codec.compress(torch.randn(24, 40) * 0.1, 1e-3)
    handle, expert = ops.matrix_handle(w)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.relu(torch.ops.moeoffload.szp_linear(x * 2, handle, expert, 0)) + 1

    x = torch.randn(5, 40)
    torch.testing.assert_close(f(x), torch.relu(ops.szp_linear(x * 2, w)) + 1)

    experts = [_expert(40, 16, torch.float32, seed=s)[:2] for s in (8, 9)]
    idx, wts = torch.tensor([[1], [0], [1], [1], [0]]), torch.rand(5, 1)
    gu, dn = ([ops.matrix_handle(pair[i])[1] for pair in experts] for i in (0, 1))

    @torch.compile(fullgraph=True, backend="eager")
    def layer(x):  # the HF path's moe_experts_call goes through the dispatcher while compiling
        return ops.moe_experts_call(x * 2, idx, wts, handle, gu, 0, dn, 0, None, None, "silu", 0, 1.702, 7.0) + 1

    torch.testing.assert_close(layer(x), ops.moe_experts(x * 2, idx, wts, experts) + 1)


def test_import_touches_no_gpu():
    code = ("import sys, moeoffload, moeoffload.ops, moeoffload.cache\n"
            "import torch\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_named():
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    with pytest.raises(ShapeError):
        ops.szp_linear(torch.randn(2, 15), ct)  # input dim does not match
    with pytest.raises(UnsupportedDtypeError):
        ops.szp_linear(torch.randn(2, 16).to(torch.float64), ct)
    with pytest.raises(UnsupportedDtypeError):
        ops.szp_linear(torch.randn(2, 16), codec.compress(torch.randn(8, 16), 1e-3, codec="sz3"))
    with pytest.raises(ShapeError):
        ops.szp_linear(torch.randn(2, 16), codec.compress(torch.randn(8, 4, 4), 1e-3))  # not 2-D
    with pytest.raises(ShapeError):
        ops.szp_linear(torch.randn(2, 16), codec.compress(torch.randn(128), 1e-3))
    with pytest.raises(InvalidArgumentError):
        torch.ops.moeoffload.szp_linear(torch.randn(2, 16), ops.matrix_handle(ct)[0], 10**6, 0)  # unknown expert
    with pytest.raises(InvalidArgumentError):
        torch.ops.moeoffload.szp_linear(torch.randn(2, 16), 10**9, 0, 0)  # unknown handle
    gu, dn, _, _ = _expert(16, 8, torch.float32, seed=4)
    with pytest.raises(ShapeError):
        ops.expert_mlp(torch.randn(2, 16), dn, gu)  # swapped
    with pytest.raises(InvalidArgumentError):
        ops.expert_mlp(torch.randn(2, 16), gu, dn, act="tanh")
    with pytest.raises(ShapeError):
        ops.expert_mlp(torch.randn(2, 16), gu, dn, gate_up_bias=torch.randn(3))
    # (these met torch's broadcasting, reshape and matmul RuntimeErrors, and nanobind's TypeError)
    with pytest.raises(ShapeError, match="bias"):
        ops.szp_linear(torch.randn(2, 16), ct, bias=torch.randn(5))
    with pytest.raises(ShapeError, match="transposed"):
        ops.expert_mlp(torch.randn(2, 16), gu, dn, transposed=True)  # not [H, 2I] and [I, H]
    with pytest.raises(ShapeError, match="down_bias"):
        ops.expert_mlp(torch.randn(2, 8), codec.compress(torch.randn(8, 32), 1e-3), codec.compress(torch.randn(16, 8), 1e-3),
                       transposed=True, down_bias=torch.randn(5))
    with pytest.raises(InvalidArgumentError, match="CPU or a CUDA device"):
        torch.ops.moeoffload.szp_decode(*ops.matrix_handle(ct), 0, torch.device("meta"))
    with pytest.raises(ShapeError, match=r"0 < in.*got \[8, 0\]"):  # (reshape's RuntimeError before)
        ops.szp_linear(torch.randn(2, 0), codec.compress(torch.randn(8, 0), 1e-3))
    assert ops.szp_linear(torch.randn(0, 3, 16), ct).shape == (0, 3, 8)
    # the closed-runtime case is in test_runtime.py


def test_ids_layouts_and_gate_parameters_out_of_range_are_named():
    # (these met nanobind's "incompatible function arguments" TypeError, IndexError, AssertionError and
    # ValueError; a NaN limit made the fused kernel skip the clamp its reference applies)
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    h, e = ops.matrix_handle(ct)
    gu, dn, _, _ = _expert(16, 8, torch.float32, seed=4)
    (gh, ge), (dh, de) = ops.matrix_handle(gu), ops.matrix_handle(dn)
    x = torch.randn(3, 16)
    mlp = torch.ops.moeoffload.expert_mlp
    for expert, matrix in ((-1, 0), (e, -1), (2**32, 0), (e, 2**40)):
        with pytest.raises(InvalidArgumentError, match="ids are integers"):
            torch.ops.moeoffload.szp_decode(h, expert, matrix, torch.device("cpu"))
        with pytest.raises(InvalidArgumentError, match="ids are integers"):
            torch.ops.moeoffload.szp_linear(x, h, expert, matrix)
    with pytest.raises(InvalidArgumentError, match="ids are integers"):
        mlp(x, gh, -5, 0, dh, de, 0, None, None, "silu", 0, 1.7, 7.0)
    with pytest.raises(InvalidArgumentError, match="gate layout"):
        mlp(x, gh, ge, 0, dh, de, 0, None, None, "silu", 2**40, 1.7, 7.0)
    with pytest.raises(ShapeError):
        mlp(torch.tensor(1.0), gh, ge, 0, dh, de, 0, None, None, "silu", 0, 1.7, 7.0)
    with pytest.raises(InvalidArgumentError, match="ids are integers"):
        ops.moe_experts_call(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), gh, [-1], 0, [de], 0, None, None,
                             "silu", 0, 1.7, 7.0)
    scalar = codec.compress(torch.tensor(0.5), 1e-3)  # (kept: its registration goes with it)
    scalar_h, scalar_e = ops.matrix_handle(scalar)
    with pytest.raises(ShapeError, match="2-D"):
        torch.ops.moeoffload.szp_linear(x, scalar_h, scalar_e, 0)
    if not torch.cuda.is_available():
        with pytest.raises(CudaError):
            torch.ops.moeoffload.szp_decode(h, e, 0, torch.device("cuda"))
    for alpha, limit in (("x", 7.0), (float("nan"), 7.0), (1.7, float("nan")), (1.7, -1.0), (1.7, 0.0)):
        with pytest.raises(InvalidArgumentError, match="alpha|limit"):
            ops.expert_mlp(x, gu, dn, act="gptoss", alpha=alpha, limit=limit)
        if not isinstance(alpha, str):  # the native check, for the ops' own callers
            with pytest.raises(InvalidArgumentError, match="alpha|limit"):
                mlp(x, gh, ge, 0, dh, de, 0, None, None, "gptoss", 0, alpha, limit)
    ops.expert_mlp(x, gu, dn, act="gptoss", limit=float("inf"))  # no clamp


def test_biases_and_weights_of_other_dtypes_are_refused_not_cast():
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    gu, dn, _, _ = _expert(16, 8, torch.float32, seed=4)
    x = torch.randn(3, 16)
    for bad in (torch.ones(8, dtype=torch.int64), torch.ones(8, dtype=torch.complex64), torch.ones(8, dtype=torch.bool)):
        with pytest.raises(UnsupportedDtypeError, match="bias"):
            ops.szp_linear(x, ct, bias=bad)  # (complex lost its imaginary part with a warning)
    with pytest.raises(InvalidArgumentError, match="meta"):
        ops.szp_linear(x, ct, bias=torch.zeros(8, device="meta"))
    with pytest.raises(ShapeError, match="gate_up_bias"):
        ops.expert_mlp(x, gu, dn, gate_up_bias=[0.0] * 16)
    with pytest.raises(UnsupportedDtypeError, match="down_bias"):
        ops.expert_mlp(torch.randn(3, 8), *_expert(8, 8, torch.float32, seed=1)[:2], transposed=False,
                       down_bias=torch.ones(8, dtype=torch.int32))
    experts = [_expert(16, 8, torch.float32, seed=s)[:2] for s in range(2)]
    routing = torch.tensor([[0, 1], [1, 0], [0, 1]])
    for bad in (torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.int64),
                torch.ones(3, 2, dtype=torch.complex64)):
        with pytest.raises(UnsupportedDtypeError, match="top_k_weights"):
            ops.moe_experts(x, routing, bad, experts)


def test_the_fake_kernels_check_x_as_the_ops_do():
    # traced (or on the meta device), a wrong x got a shape from szp_linear's and expert_mlp's fakes
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    h, e = ops.matrix_handle(ct)
    gu, dn, _, _ = _expert(16, 8, torch.float32, seed=4)
    (gh, ge), (dh, de) = ops.matrix_handle(gu), ops.matrix_handle(dn)
    assert torch.ops.moeoffload.szp_linear(torch.empty(3, 16, device="meta"), h, e, 0).shape == (3, 8)
    for x, err in ((torch.empty(3, 15, device="meta"), ShapeError),
                   (torch.empty(3, 16, device="meta", dtype=torch.int32), UnsupportedDtypeError)):
        with pytest.raises(err):
            torch.ops.moeoffload.szp_linear(x, h, e, 0)
        with pytest.raises(err):
            torch.ops.moeoffload.expert_mlp(x, gh, ge, 0, dh, de, 0, None, None, "silu", 0, 1.7, 7.0)


def test_numbers_of_any_real_type_and_float_biases_are_taken():
    # the checks above must not refuse what worked before them: numpy and 0-d tensor scalars for alpha
    # and limit, a float64 bias (cast, as F.linear's callers expect of szp_linear)
    ct = codec.compress(torch.randn(8, 16), 1e-3)
    gu, dn, _, _ = _expert(16, 8, torch.float32, seed=4)
    x = torch.randn(3, 16)
    ref = ops.expert_mlp(x, gu, dn, act="gptoss", alpha=1.702, limit=7.0)
    for alpha, limit in ((np.float32(1.702), np.int64(7)), (torch.tensor(1.702), torch.tensor(7.0))):
        torch.testing.assert_close(ops.expert_mlp(x, gu, dn, act="gptoss", alpha=alpha, limit=limit), ref)
    bias = torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(ops.szp_linear(x, ct, bias=bias), ops.szp_linear(x, ct) + bias.float())


def test_a_matrix_that_is_not_2d_is_named_by_every_op():
    vector = codec.compress(torch.randn(8), 1e-3)
    gu, _, _, _ = _expert(16, 8, torch.float32, seed=4)
    (gh, ge), (vh, ve) = ops.matrix_handle(gu), ops.matrix_handle(vector)
    for device in ("cpu", "meta"):  # (the op, and its fake)
        with pytest.raises(ShapeError, match="2-D"):
            torch.ops.moeoffload.expert_mlp(torch.randn(3, 16, device=device), gh, ge, 0, vh, ve, 0, None, None,
                                            "silu", 0, 1.7, 7.0)
