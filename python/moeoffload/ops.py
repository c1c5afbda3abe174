"""Compute straight from compressed experts: torch custom ops and their one-call forms.

    y = moeoffload.ops.szp_linear(x, ct)                 # x [T, in] · Ŵᵀ, ct a CompressedTensor [out, in]
    y = moeoffload.ops.expert_mlp(x, gate_up, down)      # down(silu(gate(x)) * up(x))
    y = moeoffload.ops.moe_experts(x, top_k_index, top_k_weights, [(gate_up, down), ...])  # a whole layer

The ops are registered as ``torch.ops.moeoffload.szp_linear``, ``expert_mlp``,
``moe_experts`` and ``szp_decode`` (``torch.library.custom_op`` with a fake
beside each, so they trace under ``torch.compile``). Their schemas take tensors and integers
only: a matrix is addressed by (handle, expert, matrix index), where the
handle belongs to a runtime (``ExpertCache.handle``; the expert must be
acquired) or to the registry of standalone CompressedTensors used here.

Semantics: the product uses each weight as q * step (before its rounding to
the stored dtype), accumulates x * q in float32, scales by step once per output
(so it overflows 1/step times sooner than x * w would: |x| near 1e30 at fine
bounds) and returns x's dtype; values kept exactly (exceptions) are included.
Every weight so used is within the bound of the original (docs/format.md).

Paths: on the CPU the native fused kernels run for every T (AVX-512 / AVX2 /
portable, chosen at run time); with ``dense_above`` (the measured crossover,
see bench/fused.py) the matrix is decoded into a scratch tensor and multiplied
by ``F.linear`` instead. ``direct=True`` calls the native function without the
dispatcher (the eager decode loop), see the README for the measured overhead.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import threading
import weakref

import torch
import torch.nn.functional as F

from . import _native
from .codec import _CODE_DTYPES, CompressedTensor
from .errors import CudaError, InvalidArgumentError, ShapeError, UnsupportedDtypeError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gptoss")
MAX_CUDA_ASSIGNMENTS = _native.MOE_EXPERTS_MAX_CUDA_ASSIGNMENTS  # tokens x top-k of one moe_experts call on CUDA
GATE_LAYOUTS = {"concatenated": 0, "interleaved": 1}
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the ops multiply

# ---- the registry of standalone CompressedTensors ------------------------------------------

_host = None
_host_handle = None
_registered: dict[int, tuple[int, int]] = {}
# HostMatrices.add releases the GIL: without a lock, threads meeting a tensor first each added it and
# all but one copy leaked. Reentrant: a finalizer (_forget) may run in a thread that holds it.
_registry_lock = threading.RLock()


def _fresh_registry_lock() -> None:
    """In a forked child: a lock another thread held at the fork would never be released there."""
    global _registry_lock
    _registry_lock = threading.RLock()


os.register_at_fork(after_in_child=_fresh_registry_lock)


def matrix_handle(ct: CompressedTensor) -> tuple[int, int]:
    """(handle, expert) under which ops address a standalone CompressedTensor (parsed once)."""
    global _host, _host_handle
    if not isinstance(ct, CompressedTensor):
        raise UnsupportedDtypeError(f"expected a CompressedTensor, got {type(ct).__name__}")
    if ct.codec != "szp":
        raise UnsupportedDtypeError("the fused ops compute on szp tensors; this one is "
                                    f"{ct.codec!r} (compress with codec='szp')")
    key = id(ct)
    found = _registered.get(key)
    if found is not None:
        return found
    with _registry_lock:
        if key not in _registered:
            if _host is None:
                _host = _native.HostMatrices()
                _host_handle = _host.register()
            _registered[key] = (_host_handle, _host.add(ct.buffer))
            weakref.finalize(ct, _forget, key)
        return _registered[key]


def _forget(key: int) -> None:
    with _registry_lock:
        handle_expert = _registered.pop(key, None)
        if handle_expert is not None and _host is not None:
            _host.remove(handle_expert[1])


@atexit.register
def _drop_registry() -> None:
    global _host
    _registered.clear()
    _host = None


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.device.type == "cuda" else 0


@functools.lru_cache(maxsize=1 << 16)
def _matrix_shape(handle: int, expert: int, matrix: int) -> tuple[int, int]:
    """(rows, cols) of a matrix the ops multiply with (2-D, or ShapeError); fixed for a (handle, expert,
    matrix) since handles and ids are never reused, so asked of the native side once (failures are not
    cached)."""
    _check_ids(expert=expert, matrix=matrix)
    shape = tuple(_native.matrix_info(handle, expert, matrix)["shape"])
    if len(shape) != 2:
        raise ShapeError(f"the ops multiply with 2-D matrices [out, in]; expert {expert} matrix {matrix} "
                         f"is {list(shape)}")
    return shape


def _check_ids(**ids) -> None:
    """The native side takes ids as u32: anything else is named here, not left to nanobind's TypeError
    ("incompatible function arguments"). Each id an int, or a list of them."""
    for name, v in ids.items():
        if isinstance(v, (list, tuple)):
            bad = next((i for i in v if not 0 <= i < 1 << 32), None)
            if bad is not None:
                raise InvalidArgumentError(f"{name} holds {bad}: ids are integers in [0, 2^32)")
        elif not 0 <= v < 1 << 32:
            raise InvalidArgumentError(f"{name} {v}: ids are integers in [0, 2^32)")


def _raise_named(err: TypeError, layout: int, **ids) -> None:
    """After nanobind refused a call's arguments: raises the named error for the id (or gate layout) that
    caused it, else the original error (checked only then, so the hot path pays nothing for it)."""
    if layout not in GATE_LAYOUTS.values():
        raise InvalidArgumentError(f"gate layout must be 0 (concatenated) or 1 (interleaved), got {layout}") from err
    try:
        _check_ids(**ids)
    except InvalidArgumentError as named:
        raise named from err
    raise err


# ---- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("moeoffload::szp_linear", mutates_args=())
def _szp_linear_op(x: torch.Tensor, handle: int, expert: int, matrix: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ShapeError(f"x must be [tokens, in], got shape {tuple(x.shape)}")
    rows, _ = _matrix_shape(handle, expert, matrix)
    x = x.contiguous()
    y = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    _native.szp_linear(handle, expert, matrix, x, y, _stream(x))
    return y


@_szp_linear_op.register_fake
def _(x, handle, expert, matrix):
    rows, cols = _matrix_shape(handle, expert, matrix)
    _check_fake_input(x, cols)
    return x.new_empty(x.shape[0], rows)


def _check_fake_input(x: torch.Tensor, cols: int) -> None:
    """What the native call checks of x, checked when tracing too (a wrong x got a shape from the fake)."""
    if x.dim() != 2 or x.shape[1] != cols:
        raise ShapeError(f"x must be [tokens, {cols}], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise UnsupportedDtypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")


@torch.library.custom_op("moeoffload::expert_mlp", mutates_args=())
def _expert_mlp_op(x: torch.Tensor, gate_up_handle: int, gate_up_expert: int, gate_up_matrix: int,
                   down_handle: int, down_expert: int, down_matrix: int, gate_up_bias: torch.Tensor | None,
                   down_bias: torch.Tensor | None, act: str, layout: int, alpha: float, limit: float) -> torch.Tensor:
    if x.dim() != 2:
        raise ShapeError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    H, I = _matrix_shape(down_handle, down_expert, down_matrix)
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    scratch = torch.empty(T * 2 * I, dtype=torch.float32, device=x.device) if x.device.type == "cuda" else None
    try:
        _native.expert_mlp(gate_up_handle, gate_up_expert, gate_up_matrix, down_handle, down_expert, down_matrix, x,
                           act, layout, alpha, limit, gate_up_bias, down_bias, y, scratch, _stream(x))
    except TypeError as err:
        _raise_named(err, layout, gate_up_expert=gate_up_expert, gate_up_matrix=gate_up_matrix)
    return y


def _no_meta_beside(x: torch.Tensor, **tensors) -> None:
    """The fake kernels run for a real call too when one of its tensors is on the meta device (the
    dispatcher picks them): with x real, that call would return uninitialised memory, so it is refused.
    (Traced, every tensor is fake on the device it stands for, none on meta.)"""
    if x.device.type == "meta":
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise InvalidArgumentError(f"{name} is on the meta device (it holds no values), x on {x.device}")


@_expert_mlp_op.register_fake
def _(x, gate_up_handle, gate_up_expert, gate_up_matrix, down_handle, down_expert, down_matrix, gate_up_bias,
      down_bias, act, layout, alpha, limit):
    _no_meta_beside(x, gate_up_bias=gate_up_bias, down_bias=down_bias)
    H, _ = _matrix_shape(down_handle, down_expert, down_matrix)
    _check_fake_input(x, H)
    return x.new_empty(x.shape[0], H)


def _moe_experts_impl(x: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor, handle: int,
                      gate_up_ids: list[int], gate_up_matrix: int, down_ids: list[int], down_matrix: int,
                      gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, act: str, layout: int,
                      alpha: float, limit: float) -> torch.Tensor:
    # routing [T, k] of integers (read on the host), weights [T, k] (any float dtype, x's device)
    if routing.dtype.is_floating_point or routing.dtype.is_complex or routing.dtype == torch.bool:
        raise UnsupportedDtypeError(f"routing must hold expert indices (an integer dtype), got {routing.dtype}")
    if not weights.dtype.is_floating_point:  # (bool, integer and complex weights were cast)
        raise UnsupportedDtypeError(f"top_k_weights must be floating point, got {weights.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    routing = routing.to("cpu", torch.int64).contiguous()
    weights = weights.to(x.device, torch.float32).contiguous()
    scratch = None
    if x.device.type == "cuda" and routing.dim() == 2 and routing.numel():
        first = int(routing.numpy()[0, 0])  # a tensor's own indexing costs 15 µs
        if 0 <= first < len(down_ids):  # else the native call names what is wrong
            H, I = _matrix_shape(handle, down_ids[first], down_matrix)
            scratch = torch.empty(_native.moe_experts_cuda_scratch(routing.numel(), H, I), dtype=torch.float32,
                                  device=x.device)
    try:
        _native.moe_experts(handle, gate_up_ids, gate_up_matrix, down_ids, down_matrix, x, routing.numpy(), weights,
                            act, layout, alpha, limit, gate_up_bias, down_bias, out, scratch, _stream(x))
    except TypeError as err:
        _raise_named(err, layout, gate_up_ids=gate_up_ids, down_ids=down_ids, gate_up_matrix=gate_up_matrix,
                     down_matrix=down_matrix)
    return out


# The tags of an op that does host work (reads the routing, fetches experts): inductor's CUDA graphs
# then partition around it instead of replaying what it did once (the tag exists from torch 2.8 on).
UNSAFE_IN_CUDA_GRAPHS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)

_moe_experts_op = torch.library.custom_op("moeoffload::moe_experts", _moe_experts_impl, mutates_args=(),
                                          tags=UNSAFE_IN_CUDA_GRAPHS)


@_moe_experts_op.register_fake
def _(x, routing, weights, handle, gate_up_ids, gate_up_matrix, down_ids, down_matrix, gate_up_bias, down_bias, act,
      layout, alpha, limit):
    _no_meta_beside(x, top_k_index=routing, top_k_weights=weights, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return x.new_empty(x.shape)  # contiguous, as the op's output is whatever x's strides


def moe_experts_call(*args) -> torch.Tensor:
    """``torch.ops.moeoffload.moe_experts(*args)``. Inference on plain tensors (no grad, not tracing: a decode
    step) calls its implementation without the dispatcher, whose per-call cost (about 45 µs on the CPU) it
    would pay at every layer; anything else (torch.compile, fake or traced tensors, autograd, which then
    says the op has no backward) goes through the op."""
    x = args[0]
    if type(x) is torch.Tensor and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _moe_experts_impl(*args)
    return torch.ops.moeoffload.moe_experts(*args)


@torch.library.custom_op("moeoffload::szp_decode", mutates_args=())
def _szp_decode_op(handle: int, expert: int, matrix: int, device: torch.device) -> torch.Tensor:
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"szp_decode decodes onto the CPU or a CUDA device, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaError(f"szp_decode onto {device} needs a CUDA GPU; none is available")
    _check_ids(expert=expert, matrix=matrix)
    info = _native.matrix_info(handle, expert, matrix)
    out = torch.empty(info["shape"], dtype=_CODE_DTYPES[info["dtype"]], device=device)
    _native.szp_decode_matrix(handle, expert, matrix, out, _stream(out))
    return out


@_szp_decode_op.register_fake
def _(handle, expert, matrix, device):
    _check_ids(expert=expert, matrix=matrix)
    info = _native.matrix_info(handle, expert, matrix)
    return torch.empty(info["shape"], dtype=_CODE_DTYPES[info["dtype"]], device=device)


# ---- one-call forms ----------------------------------------------------------------------------


def _as_tokens(x: torch.Tensor, cols: int, what: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    if not isinstance(x, torch.Tensor):
        raise UnsupportedDtypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise UnsupportedDtypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ShapeError(f"{what} must end in the weight's input dimension {cols}, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    return x.reshape(math.prod(lead), cols), lead  # (-1 cannot be inferred when cols is 0)


def szp_linear(x: torch.Tensor, weight: CompressedTensor, bias: torch.Tensor | None = None, *,
               dense_above: int | None = None, direct: bool = False) -> torch.Tensor:
    """F.linear(x, Ŵ, bias) computed from the compressed weight [out, in] (szp, 2-D).

    x [..., in] of float32/bfloat16/float16 on the CPU (the weight's host bytes);
    the result has x's dtype. dense_above: above this many tokens decode Ŵ and
    use F.linear (the crossover of bench/fused.py); direct: skip the dispatcher.
    """
    if not isinstance(weight, CompressedTensor) or len(weight.shape) != 2:
        raise ShapeError("szp_linear needs a 2-D CompressedTensor [out, in]")
    out_f, in_f = weight.shape
    x2, lead = _as_tokens(x, in_f, "x")
    _check_bias(bias, out_f, "bias")
    _no_meta_beside(x2, bias=bias)
    if dense_above is not None and x2.shape[0] > dense_above:
        y = F.linear(x2, weight.decompress(dtype=x2.dtype, device=x2.device))
    else:
        handle, expert = matrix_handle(weight)
        if direct:
            x2 = x2.contiguous()
            y = torch.empty(x2.shape[0], out_f, dtype=x2.dtype, device=x2.device)
            _native.szp_linear(handle, expert, 0, x2, y, _stream(x2))
        else:
            y = torch.ops.moeoffload.szp_linear(x2, handle, expert, 0)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, out_f)


def expert_mlp(x: torch.Tensor, gate_up: CompressedTensor, down: CompressedTensor, *, act: str = "silu",
               gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
               layout: str = "concatenated", alpha: float = 1.702, limit: float = 7.0,
               transposed: bool = False) -> torch.Tensor:
    """down(act(gate(x)) ⊙ up(x)) for one expert, from its compressed matrices, in one call.

    Fused (never decodes a weight): gate_up [2I, H] (gate rows then up rows, or
    ``layout="interleaved"``: gate, up, gate, ... as GPT-OSS stores them),
    down [H, I], activations silu / gelu / gelu_tanh / relu, and ``act="gptoss"``,
    GPT-OSS's clamped gate: gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate).
    Biases (1-D, x's dtype) are added after each projection.

    ``transposed=True`` (storage [H, 2I] and [I, H], as GPT-OSS checkpoints
    keep them) is NOT fused: both matrices are decoded and multiplied densely.
    A table built for the offload path stores such matrices transposed back, so
    the fused path applies there.
    """
    _check_gate(act, layout, alpha, limit)
    for name, m in (("gate_up", gate_up), ("down", down)):
        if not isinstance(m, CompressedTensor) or len(m.shape) != 2:
            raise ShapeError(f"{name} must be a 2-D CompressedTensor")
    if transposed:  # storage [H, 2I] and [I, H]
        (H, I2), want = gate_up.shape, (gate_up.shape[1] // 2, gate_up.shape[0])
        if I2 % 2 or tuple(down.shape) != want:
            raise ShapeError(f"transposed expert: gate_up must be [H, 2I] and down [I, H], got "
                             f"{list(gate_up.shape)} and {list(down.shape)}")
        x2, lead = _as_tokens(x, H, "x")
        _check_bias(gate_up_bias, I2, "gate_up_bias")
        _check_bias(down_bias, H, "down_bias")
        y = _expert_mlp_dense(x2, gate_up.decompress().T, down.decompress().T, act, gate_up_bias, down_bias,
                              layout, alpha, limit)
        return y.reshape(*lead, H)
    H = gate_up.shape[1]
    x2, lead = _as_tokens(x, H, "x")
    _check_bias(gate_up_bias, gate_up.shape[0], "gate_up_bias")
    _check_bias(down_bias, down.shape[0], "down_bias")
    gh, ge = matrix_handle(gate_up)
    dh, de = matrix_handle(down)
    y = torch.ops.moeoffload.expert_mlp(x2, gh, ge, 0, dh, de, 0, gate_up_bias, down_bias, act, GATE_LAYOUTS[layout],
                                        float(alpha), float(limit))
    return y.reshape(*lead, y.shape[-1])


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                experts: list[tuple[CompressedTensor, CompressedTensor]], *, act: str = "silu",
                layout: str = "concatenated", alpha: float = 1.702, limit: float = 7.0,
                gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j top_k_weights[t, j] · expert_mlp(x[t], *experts[top_k_index[t, j]]) for every token, in one call:
    an MoE layer's experts part, from compressed (gate_up, down) pairs. x [T, H]; top_k_index [T, k];
    biases [E, 2I] and [E, H] in x's dtype. The sum is formed as transformers' eager experts loop forms
    it: expert by expert ascending, each weighted output and each sum rounded to x's dtype."""
    _check_gate(act, layout, alpha, limit)
    for name, t in (("x", x), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights),
                    ("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise UnsupportedDtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
        raise ShapeError("moe_experts needs x [T, H] and top_k_index, top_k_weights [T, k]")
    # (expert_mlp always goes through the dispatcher, whose fake kernel checks; this may not)
    _no_meta_beside(x, top_k_index=top_k_index, top_k_weights=top_k_weights, gate_up_bias=gate_up_bias,
                    down_bias=down_bias)
    if not experts or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in experts):
        raise ShapeError("moe_experts needs the layer's experts: a list of (gate_up, down) CompressedTensors")
    gu = [matrix_handle(g) for g, _ in experts]  # standalone tensors share one registry handle
    dn = [matrix_handle(d) for _, d in experts]
    # every expert, routed or not, with any number of tokens (the kernel sees only the routed ones)
    H, I = x.shape[1], experts[0][1].shape[-1]
    for e, (g, d) in enumerate(experts):
        if tuple(g.shape) != (2 * I, H) or tuple(d.shape) != (H, I):
            raise ShapeError(f"expert {e} is not gate_up [2I, H] and down [H, I] with H = {H} (x's) and the I of "
                             f"the others ({I}): gate_up {tuple(g.shape)}, down {tuple(d.shape)}")
    return moe_experts_call(x, top_k_index, top_k_weights, gu[0][0], [e for _, e in gu], 0, [e for _, e in dn], 0,
                            gate_up_bias, down_bias, act, GATE_LAYOUTS[layout], float(alpha), float(limit))


def _check_bias(bias, n: int, name: str) -> None:
    """None, or a floating-point tensor [n] (added to a projection's n outputs)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
        raise ShapeError(f"{name} must be a tensor [{n}] (the projection's outputs), got "
                         f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if not bias.dtype.is_floating_point:  # (an int or complex one was cast; a float one still is)
        raise UnsupportedDtypeError(f"{name} must be floating point, got {bias.dtype}")


def _check_gate(act: str, layout: str, alpha, limit) -> None:
    if act not in ACTIVATIONS:
        raise InvalidArgumentError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if layout not in GATE_LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {tuple(GATE_LAYOUTS)}, got {layout!r}")
    # as the native side checks them (mlp_config): a NaN limit skipped the fused kernel's clamp
    if not math.isfinite(_real(alpha, "alpha")):
        raise InvalidArgumentError(f"alpha must be a finite number, got {alpha!r}")
    if not _real(limit, "limit") > 0:
        raise InvalidArgumentError(f"limit must be a number > 0 (inf: no clamp), got {limit!r}")


def _real(v, name: str) -> float:
    """float(v) of a real number (numpy and 0-d tensors too), not of a bool or a string."""
    if isinstance(v, (bool, str, bytes)):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}") from None


def _gate(gu: torch.Tensor, act: str, layout: str, alpha: float, limit: float) -> torch.Tensor:
    if layout == "interleaved":
        g, u = gu[..., ::2], gu[..., 1::2]
    else:
        g, u = gu.chunk(2, dim=-1)
    if act == "gptoss":
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    fn = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}[act]
    return fn(g) * u


def _expert_mlp_dense(x, gate_up_w, down_w, act, gate_up_bias, down_bias, layout, alpha, limit):
    """The reference: dense float32 math on decoded [2I, H] and [H, I] weights (also the non-fused variant)."""
    xf = x.float()
    gu = F.linear(xf, gate_up_w.float(), None if gate_up_bias is None else gate_up_bias.float())
    h = _gate(gu, act, layout, alpha, limit)
    y = F.linear(h, down_w.float(), None if down_bias is None else down_bias.float())
    return y.to(x.dtype)


def expert_mlp_reference(x, gate_up: CompressedTensor, down: CompressedTensor, **kw) -> torch.Tensor:
    """decode + dense float32 of expert_mlp, with the weights the fused kernel uses (tests, benchmarks)."""
    return _expert_mlp_dense(x, gate_up.decompress(dtype=torch.float32), down.decompress(dtype=torch.float32),
                             kw.get("act", "silu"), kw.get("gate_up_bias"), kw.get("down_bias"),
                             kw.get("layout", "concatenated"), kw.get("alpha", 1.702), kw.get("limit", 7.0))
