import numpy as np
import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def max_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| in float64 (0 for empty tensors)."""
    if x.numel() == 0:
        return 0.0
    return float((x.double() - y.double()).abs().max())


def fix_crc(buf: np.ndarray) -> np.ndarray:
    """A copy of a codec buffer with its trailing CRC32 recomputed (so the checks behind it run)."""
    import zlib

    buf = buf.copy()
    if buf.size >= 4:
        buf[-4:] = np.frombuffer(np.uint32(zlib.crc32(buf[:-4].tobytes())).tobytes(), np.uint8)
    return buf


def bit_flips(buf: np.ndarray, rng, count: int):
    """`count` copies of buf with 1-3 random bits flipped each."""
    for _ in range(count):
        mutated = buf.copy()
        for _ in range(rng.integers(1, 4)):
            pos = rng.integers(0, mutated.size)
            mutated[pos] ^= np.uint8(1 << rng.integers(0, 8))
        yield mutated


def fuzz_bit_flips(buffers, inspect, decode, count: int, seed: int = 7) -> int:
    """Bit flips (`count` per buffer): half of the changed copies must fail their CRC check in `inspect`
    (CorruptDataError), then go on with the CRC recomputed; every copy goes to `decode`, which must
    raise CorruptDataError or succeed. Returns how many copies were decoded."""
    from moeoffload.errors import CorruptDataError

    rng = np.random.default_rng(seed)
    cases = 0
    for buf in buffers:
        for mutated in bit_flips(buf, rng, count):
            if rng.random() < 0.5 and not np.array_equal(mutated, buf):
                with pytest.raises(CorruptDataError):
                    inspect(mutated, True)
                mutated = fix_crc(mutated)
            decode(mutated)
            cases += 1
    return cases


def word_mutations(buf: np.ndarray, rng, step: int, limit: int, edge):
    """Copies of buf (CRC fixed) with the word at each `step`-th offset below `limit` set to each edge
    value and one random value."""
    for at in range(0, min(buf.size - 4, limit), step):
        for value in list(edge) + [int(rng.integers(0, 2**63))]:
            mutated = buf.copy()
            word = np.frombuffer(np.uint64(value).tobytes(), np.uint8)
            n = min(8, mutated.size - 4 - at)
            mutated[at : at + n] = word[:n]
            yield fix_crc(mutated)


def cuda_available() -> bool:
    import moeoffload

    return torch.cuda.is_available() and moeoffload.backend_info()["built_with_cuda"]


# A small random Mixtral-format state_dict (legacy per-expert keys) for table tests.
L, E, H, I = 3, 4, 64, 96


def mixtral_state_dict(seed=0, dtype=torch.bfloat16, layers=L):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(10, H, generator=g).to(dtype)}
    for l in range(layers):
        sd[f"model.layers.{l}.block_sparse_moe.gate.weight"] = torch.randn(E, H, generator=g).to(dtype)
        for e in range(E):
            p = f"model.layers.{l}.block_sparse_moe.experts.{e}"
            sd[f"{p}.w1.weight"] = (0.02 * torch.randn(I, H, generator=g)).to(dtype)
            sd[f"{p}.w2.weight"] = (0.02 * torch.randn(H, I, generator=g)).to(dtype)
            sd[f"{p}.w3.weight"] = (0.02 * torch.randn(I, H, generator=g)).to(dtype)
    return sd


def mixtral_model(seed=0, layers=L):
    """A tiny random transformers Mixtral (float32, eval) with L layers of E experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()
