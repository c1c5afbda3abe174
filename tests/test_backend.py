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


def test_codec_threads_work_in_a_forked_child():
    """The persistent thread pool is rebuilt after fork (no hang, same result)."""
    import os
    import time

    import numpy as np
    import pytest
    import torch

    from moeoffload import codec

    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    x = torch.randn(512, 512)
    ct = codec.compress(x, 1e-2)
    ct.decompress()  # the pool exists in the parent now
    pid = os.fork()
    if pid == 0:
        try:
            # numpy, not torch, for the check: torch's OpenMP pool (live in the parent when an earlier test
            # ran a model) is not fork-safe, and this test is about the codec's own pool
            ok = float(np.abs(ct.decompress().numpy() - x.numpy()).max()) <= 1e-2
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the codec's thread pool")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
