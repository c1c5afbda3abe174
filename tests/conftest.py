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


def cuda_available() -> bool:
    import moeoffload

    return torch.cuda.is_available() and moeoffload.backend_info()["built_with_cuda"]
