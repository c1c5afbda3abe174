import pytest

from moeoffload import _native
from moeoffload.errors import ClosedError, InvalidArgumentError


def test_allocate_release_reuse_and_stats():
    pool = _native.PinnedPool("cpu")
    a = pool.allocate(10)
    assert a % 4096 == 0
    b = pool.allocate(5000)
    st = pool.stats()
    assert st["bytes_used"] == 4096 + 8192 and st["live_allocations"] == 2 and st["allocations"] == 2
    pool.release(a)
    assert pool.stats()["bytes_used"] == 8192 and pool.stats()["bytes_reserved"] == 4096 + 8192
    assert pool.allocate(100) == a  # a freed block of the same size is reused
    assert pool.stats()["bytes_reserved"] == 4096 + 8192
    with pytest.raises(InvalidArgumentError):
        pool.release(b + 1)
    pool.release(b)
    pool.trim()
    assert pool.stats()["bytes_reserved"] == 4096
    pool.close()
    assert pool.closed and pool.stats()["bytes_reserved"] == 0
    with pytest.raises(ClosedError):
        pool.allocate(1)
    pool.close()  # idempotent


def test_unknown_backend_is_a_named_error():
    with pytest.raises(InvalidArgumentError, match="unknown backend"):
        _native.PinnedPool("tpu")
