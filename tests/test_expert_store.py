import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import ClosedError, CorruptDataError, InvalidArgumentError


def test_mapped_and_copied_payloads(tmp_path):
    f = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    f.write_bytes(data.tobytes())
    pool = _native.PinnedPool("cpu")
    store = _native.ExpertStore(pool, 2, 3)
    store.map_file(str(f))
    assert store.mapped_bytes == 10_000 and pool.stats()["bytes_registered"] == 10_000 and store.pinned
    store.add_mapped(0, 100, 500)
    np.testing.assert_array_equal(store.payload(0), data[100:600])
    with pytest.raises(CorruptDataError, match="outside the mapped file"):
        store.add_mapped(1, 9_900, 200)
    store.add_copy(5, data[:77])
    np.testing.assert_array_equal(store.payload(5), data[:77])
    assert 5 in store and 1 not in store
    copies_only = _native.ExpertStore(pool, 1, 1)  # the pool's memory: pinned, with no file to pin
    copies_only.add_copy(0, data[:8])
    assert copies_only.pinned
    copies_only.close()
    assert store.max_payload_bytes == 500 and store.total_bytes == 577
    with pytest.raises(InvalidArgumentError, match="layer 0, expert 1"):
        store.payload(1)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        store.add_copy(6, data[:10])
    with pytest.raises(InvalidArgumentError, match="already maps"):
        store.map_file(str(f))
    store.close()
    assert pool.stats()["bytes_registered"] == 0 and pool.stats()["bytes_used"] == 0
    with pytest.raises(ClosedError):
        store.payload(0)
    pool.close()


def test_unreadable_files_are_named_errors(tmp_path):
    pool = _native.PinnedPool("cpu")
    store = _native.ExpertStore(pool, 1, 1)
    with pytest.raises(InvalidArgumentError, match="cannot open"):
        store.map_file(str(tmp_path / "missing"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptDataError, match="empty"):
        store.map_file(str(tmp_path / "empty"))
    with pytest.raises(InvalidArgumentError, match="before map_file"):
        store.add_mapped(0, 0, 1)


def test_matrices_must_lie_8_aligned_inside_their_payload():
    """The CUDA kernels read a matrix's offset tables with u64 loads from the slot's base plus its
    offset: a matrix 4 bytes off 8-alignment is refused when added, never launched on."""
    from moeoffload import codec
    from moeoffload.errors import TableError

    buf = codec.compress(np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64), 1e-3).buffer
    pool = _native.PinnedPool("cpu")
    store = _native.ExpertStore(pool, 1, 2)
    for eid, at in ((0, 8), (1, 4)):
        payload = np.zeros(at + buf.size, np.uint8)
        payload[at:] = buf
        store.add_copy(eid, payload)
    store.set_matrices(0, [(8, buf.size, 1, [4, 64])])
    assert store.num_matrices(0) == 1
    with pytest.raises(TableError, match="8-aligned"):
        store.set_matrices(1, [(4, buf.size, 1, [4, 64])])
    store.close()
    pool.close()
