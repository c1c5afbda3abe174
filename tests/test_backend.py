import subprocess
import sys

import moeoffload


def test_backend_info_reports_build_and_device():
    info = moeoffload.backend_info()
    for key in ("backend", "built_with_cuda", "gpu_available", "device_count", "device_name",
                "compute_capability", "reason", "num_threads"):
        assert key in info
    assert info["backend"] in ("cpu", "cuda")
    assert (info["backend"] == "cuda") == info["gpu_available"]
    if not info["gpu_available"]:
        assert info["reason"]  # says why
    else:
        assert info["compute_capability"][0] >= 7
    assert info["num_threads"] >= 1


def test_import_touches_no_gpu():
    # Importing and compressing on the CPU must not initialise CUDA.
    code = (
        "import torch, moeoffload; from moeoffload import codec; "
        "codec.compress(torch.randn(64, 64), 0.01).decompress(); "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_set_num_threads_round_trip():
    moeoffload.set_num_threads(1)
    assert moeoffload.backend_info()["num_threads"] == 1
    moeoffload.set_num_threads(0)
    assert moeoffload.backend_info()["num_threads"] >= 1
