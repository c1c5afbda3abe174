"""Expert table: build -> save -> load -> every payload equal; named errors."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moeoffload import table
from moeoffload.errors import (ChecksumError, ClosedError, InvalidArgumentError, InvalidBoundError, MissingExpertError,
                               NoMoeLayersError, NonFiniteError, TableChangedError, TableError, TableMismatchError,
                               UnsupportedDtypeError)

from conftest import E, I, L, H, mixtral_state_dict  # noqa: E402


def test_build_save_load_every_payload_equal(tmp_path):
    sd = mixtral_state_dict()
    built = table.build(sd, policy={0: 0.5, 1: 0.1, 2: 0.5}, mode="meanabs", progress=False)
    assert built.num_layers == L and built.experts_per_layer == E and built.matrix_names == ["w1", "w2", "w3"]
    built.save(tmp_path / "t")
    with table.load(tmp_path / "t", expect=sd) as loaded:
        assert loaded.mode == "map"
        for l in range(L):
            for e in range(E):
                np.testing.assert_array_equal(built.payload(l, e), loaded.payload(l, e))
                for name in ("w1", "w2", "w3"):
                    w = sd[f"model.layers.{l}.block_sparse_moe.experts.{e}.{name}.weight"]
                    eb = loaded.compressed(l, e, name).eb
                    assert eb == pytest.approx((0.1 if l == 1 else 0.5) * float(w.float().abs().mean()))
                    got = loaded.decompress(l, e, name)
                    assert got.dtype == w.dtype and got.shape == w.shape
                    assert float((got.double() - w.double()).abs().max()) <= eb


def test_fused_layout_and_checkpoint_directory(tmp_path):
    sd = mixtral_state_dict(dtype=torch.float32)
    fused = {}
    for l in range(L):
        p = f"model.layers.{l}.block_sparse_moe.experts"
        gate = torch.stack([sd[f"{p}.{e}.w1.weight"] for e in range(E)])
        up = torch.stack([sd[f"{p}.{e}.w3.weight"] for e in range(E)])
        fused[f"model.layers.{l}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        fused[f"model.layers.{l}.mlp.experts.down_proj"] = torch.stack([sd[f"{p}.{e}.w2.weight"] for e in range(E)])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(fused, str(ckpt / "model.safetensors"))
    t = table.build(ckpt, policy=1e-3, progress=False)
    assert t.matrix_names == ["down_proj", "gate_up_proj"] and t.manifest["model"]["id"] == "ckpt"
    got = t.decompress(2, 3, "gate_up_proj")
    assert float((got - fused["model.layers.2.mlp.experts.gate_up_proj"][3]).abs().max()) <= 1e-3


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_a_table_of_other_weights_of_the_same_layout_is_refused(tmp_path, layout):
    # A fine-tune's table served with its base model (or the reverse) passed every layout check and gave
    # garbage. The manifest holds a digest of every expert matrix's first row, checked against a
    # state_dict and a checkpoint alike (from a checkpoint only those rows are read).
    sd = {k: v for k, v in mixtral_state_dict().items() if ".experts." in k}
    if layout == "fused":  # [E, ...] stacked parameters: the rows are sliced out of them
        sd = {f"model.layers.{l}.mlp.experts.{n}": torch.stack(
            [sd[f"model.layers.{l}.block_sparse_moe.experts.{e}.{n}.weight"] for e in range(E)])
              for l in range(L) for n in ("w1", "w2", "w3")}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "model.safetensors"))
    tuned = {k: v + (1 if k == min(sd) else 0) * 1e-2 for k, v in sd.items()}  # one matrix moved a little
    for source in (sd, ckpt):
        t = table.build(source, policy=0.3, mode="meanabs", progress=False)
        t.check_matches(sd)
        t.check_matches(ckpt)
        with pytest.raises(TableMismatchError, match="other weights of the same layout"):
            t.check_matches(tuned)
    t.save(tmp_path / "t")
    with pytest.raises(TableMismatchError, match="other weights"):
        table.load(tmp_path / "t", expect=tuned)
    # meta tensors (an offloaded model's experts) have no values: their layout is all there is to check
    t.check_matches({k: v.to("meta") for k, v in sd.items()})
    # a table written before the digest: the layout is all it can check
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    del m["model"]["weights"]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    table.load(tmp_path / "t", expect=tuned).close()


def test_named_errors(tmp_path):
    sd = mixtral_state_dict()
    t = table.build(sd, policy=lambda layer: 0.01, progress=False)
    t.save(tmp_path / "t")
    with pytest.raises(TableMismatchError, match="another model"):
        table.load(tmp_path / "t", expect=mixtral_state_dict(layers=2))
    other = dict(sd)
    other["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = torch.zeros(I + 1, H, dtype=torch.bfloat16)
    with pytest.raises(TableMismatchError):
        table.load(tmp_path / "t", expect=other)

    broken = dict(sd)
    del broken["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(MissingExpertError):
        table.build(broken, policy=0.01, progress=False)
    with pytest.raises(NoMoeLayersError):
        table.build({"lm_head.weight": torch.zeros(4, 4)}, policy=0.01, progress=False)
    with pytest.raises(InvalidBoundError):
        table.build(sd, policy={0: 0.01}, progress=False)  # layers 1, 2 have no bound
    with pytest.raises(InvalidBoundError):
        table.build(sd, policy=-1.0, progress=False)

    # A flipped byte inside a payload: the CRC catches it at load.
    f = tmp_path / "t" / table.PAYLOAD_FILE
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        table.load(tmp_path / "t")
    table.load(tmp_path / "t", verify=False).close()

    # An expert missing from the manifest.
    m = json.loads((tmp_path / "t" / table.MANIFEST_FILE).read_text())
    m["experts"] = m["experts"][:-1]
    (tmp_path / "t" / table.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(MissingExpertError):
        table.load(tmp_path / "t")
    with pytest.raises(TableError, match="not a moeoffload table"):
        table.load(tmp_path / "nowhere")


def test_activation_history_round_trip_deduplicated(tmp_path):
    t = table.build(mixtral_state_dict(), policy=0.01, progress=False)
    rng = np.random.default_rng(0)
    mats = rng.integers(0, 5, (5, L, E)).astype(np.uint32)
    t.save(tmp_path / "t", history=np.concatenate([mats, mats[:2]]))
    hist = table.load_history(tmp_path / "t")
    assert len(hist) == 5
    np.testing.assert_array_equal(hist.flat().reshape(5, L, E), mats)


def test_a_bad_history_is_named_before_anything_is_written(tmp_path):
    # A save over a table with a bad history (or a build that streams to out=) wrote the payload and the
    # manifest first, then raised numpy's ValueError, leaving the old table's history beside the new one.
    first = table.build(mixtral_state_dict(0), policy=0.3, mode="meanabs", progress=False)
    mats = np.ones((2, L, E), np.uint32)
    first.save(tmp_path / "t", history=mats)
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    second = table.build(mixtral_state_dict(1), policy=0.1, mode="meanabs", progress=False)
    for bad in (np.ones((5, 7)), -np.ones((2, L, E), np.int64), np.full((1, L, E), 0.5), "junk", [[1, 2], [3]],
                np.full((1, L, E), 2**32)):
        with pytest.raises(InvalidArgumentError, match="history"):
            second.save(tmp_path / "t", history=bad)
        with pytest.raises(InvalidArgumentError, match="history"):
            table.build(mixtral_state_dict(1), policy=0.1, mode="meanabs", progress=False, out=tmp_path / "o",
                        history=bad)
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == before
    assert not (tmp_path / "o").exists()
    # whole float counts and an empty history are histories; a save without one drops the old table's
    second.save(tmp_path / "t", history=np.zeros((0, L, E)))
    assert len(table.load_history(tmp_path / "t")) == 0
    second.save(tmp_path / "t")
    assert table.load_history(tmp_path / "t") is None
    second.save(tmp_path / "t", history=mats.astype(np.float64))
    np.testing.assert_array_equal(table.load_history(tmp_path / "t").flat().reshape(-1, L, E), mats[:1])


@pytest.mark.parametrize("content", ["truncated", "2-D", "text", "directory", "negative", "object"])
def test_a_history_file_that_is_not_one_is_a_table_error(tmp_path, content):
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(
        tmp_path / "t", history=np.ones((2, L, E), np.uint32))
    f = tmp_path / "t" / table.HISTORY_FILE
    if content == "truncated":
        f.write_bytes(f.read_bytes()[:-7])
    elif content == "2-D":
        np.save(f, np.ones((3, 4), np.uint32))
    elif content == "text":
        f.write_text("not numpy")
    elif content == "directory":
        f.unlink()
        f.mkdir()
    elif content == "negative":
        np.save(f, -np.ones((2, L, E), np.int64))
    else:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TableError, match="not an activation history"):
        table.load_history(tmp_path / "t")


def test_a_table_refuses_expert_matrices_it_cannot_store_before_writing(tmp_path):
    # codec "none" wrote a float64 table that table.load then refused (and with out= left it on disk).
    sd = {k: v.double() for k, v in mixtral_state_dict().items()}
    for codec in ("none", "szp"):
        with pytest.raises(UnsupportedDtypeError, match="float64"):
            table.build(sd, policy=0.3, codec=codec, progress=False, out=tmp_path / codec)
        assert not (tmp_path / codec).exists()


def test_ids_are_integers_in_range():
    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False)
    assert t.expert_id(L - 1, E - 1) == L * E - 1 and t.expert_id(np.int64(1), np.uint8(2)) == E + 2
    for layer, expert in ((-1, 0), (0, -1), (L, 0), (0, E), (True, 0), (0, 1.0), ("0", 0)):
        with pytest.raises(InvalidArgumentError):
            t.expert_id(layer, expert)
    for layer, expert in ((True, 0), (0.0, 0), (0, False)):
        with pytest.raises(InvalidArgumentError, match="integers"):
            t.decompress(layer, expert, t.matrix_names[0])
    torch.testing.assert_close(t.decompress(np.int32(0), 0, t.matrix_names[0]), t.decompress(0, 0, t.matrix_names[0]))


@pytest.fixture
def saved(tmp_path):
    sd = mixtral_state_dict()
    built = table.build(sd, policy=0.3, mode="meanabs", progress=False)
    built.save(tmp_path / "t")
    return tmp_path / "t", built


def _overwrite_payloads(path):
    f = path / table.PAYLOAD_FILE
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:] = bytes(len(raw) - len(raw) // 2)
    f.write_bytes(bytes(raw))


def test_copy_mode_is_independent_of_the_files(saved):
    path, built = saved
    t = table.load(path, mode="copy")
    _overwrite_payloads(path)
    (path / table.PAYLOAD_FILE).unlink()
    for l in range(L):
        for e in range(E):
            np.testing.assert_array_equal(t.payload(l, e), built.payload(l, e))
    t.close()
    with pytest.raises(ClosedError):
        t.payload(0, 0)


@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_map_mode_detects_a_changed_file(saved, change):
    path, built = saved
    t = table.load(path)
    np.testing.assert_array_equal(t.payload(1, 1), built.payload(1, 1))
    f = path / table.PAYLOAD_FILE
    if change == "truncate":  # once a SIGBUS at the next read
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 3)
    elif change == "overwrite":
        _overwrite_payloads(path)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # a coarse clock still sees it
    with pytest.raises(TableChangedError, match="load it again"):
        t.payload(L - 1, E - 1)
    t.close()


def test_map_mode_keeps_reading_the_file_it_loaded_when_the_path_is_replaced(saved):
    path, built = saved
    t = table.load(path)
    other = path / "other"  # a new file (a new inode) under the same name: the open one is untouched
    other.write_bytes(bytes(100))
    other.replace(path / table.PAYLOAD_FILE)
    np.testing.assert_array_equal(t.payload(L - 1, E - 1), built.payload(L - 1, E - 1))
    t.close()


def test_unknown_load_mode(saved):
    with pytest.raises(InvalidArgumentError, match="load mode"):
        table.load(saved[0], mode="mmap")


@pytest.mark.parametrize("header", [
    b"[]", b"null", b"3", b'{"0.0": 5}', b'{"0.0": {"dtype": "U8"}}',
    b'{"0.0": {"dtype": "U8", "shape": [4], "data_offsets": [0]}}',
    b'{"0.0": {"dtype": "U8", "shape": [4], "data_offsets": ["0", 4]}}',
    b'{"0.0": {"dtype": "U8", "shape": [4], "data_offsets": [4, 0]}}',
    b'{"0.0": {"dtype": "U8", "shape": [4], "data_offsets": [0, 1000000]}}',
    b'{"0.0": {"dtype": 7, "shape": [4], "data_offsets": [0, 4]}}',
    b'{"0.0": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}',
    b'{"0.0": {"dtype": "U8", "shape": [4], "data_offsets": [0, true]}}',
    b'[[[[[[[[[[' * 20000,
])
def test_malformed_safetensors_headers_are_table_errors(saved, header):
    path, _ = saved
    (path / table.PAYLOAD_FILE).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(TableError, match="safetensors"):
        table.load(path)


def test_missing_expert_message_is_not_quoted(saved):
    path, t = saved
    with pytest.raises(MissingExpertError) as e:
        t.entry(L, 0)
    assert str(e.value) == f"the table has no layer {L} expert 0"


def test_what_a_hostile_run_found_is_named(saved, tmp_path):
    path, _ = saved
    with pytest.raises(InvalidArgumentError, match="capacity"):  # (nanobind's TypeError, or a history of 2)
        table.load_history(path, capacity=-1)
    with pytest.raises(InvalidArgumentError, match="capacity"):
        table.load_history(path, capacity=2.5)
    text = (path / table.MANIFEST_FILE).read_text()
    (path / table.MANIFEST_FILE).write_text(text.replace('"codec":', '"codec": "sz3", "codec":', 1))
    with pytest.raises(TableError, match="'codec' twice"):  # json kept the last one
        table.load(path)
    sd = mixtral_state_dict()
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    sd[key] = sd[key].clone()
    sd[key][3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=f"expert matrix '{key}': input holds NaN"):
        table.build(sd, policy=0.3, progress=False)
    ckpt = tmp_path / "f64"
    ckpt.mkdir()
    save_file({k: v.double() for k, v in mixtral_state_dict().items()}, str(ckpt / "model.safetensors"))
    with pytest.raises(UnsupportedDtypeError, match="is F64: a table stores"):  # was "is None"
        table.build(ckpt, policy=0.3, progress=False)


def test_a_version_1_table_says_how_to_rebuild(saved):
    from moeoffload.errors import FormatVersionError, TableVersionError

    path, _ = saved
    m = json.loads((path / table.MANIFEST_FILE).read_text())
    m["version"] = 1  # its payloads hold szp v1 buffers
    (path / table.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(TableVersionError, match=r"rebuild the table .*table\.build") as e:
        table.load(path)
    assert isinstance(e.value, TableError) and isinstance(e.value, FormatVersionError)


def test_build_streams_to_disk_and_the_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    sd = mixtral_state_dict()
    in_memory = table.build(sd, policy=0.3, mode="meanabs", progress=False)
    streamed = table.build(sd, policy=0.3, mode="meanabs", progress=False, out=tmp_path / "s")
    assert streamed.mode == "map" and not (tmp_path / "s" / (table.PAYLOAD_FILE + ".tmp")).exists()
    assert streamed.manifest == in_memory.manifest
    streamed.verify()
    with safe_open(str(tmp_path / "s" / table.PAYLOAD_FILE), framework="np") as f:  # the reference reader agrees
        for l in range(L):
            for e in range(E):
                np.testing.assert_array_equal(f.get_tensor(f"{l}.{e}"), in_memory.payload(l, e))
                np.testing.assert_array_equal(streamed.payload(l, e), in_memory.payload(l, e))
    streamed.close()


def test_a_failed_streaming_build_leaves_no_partial_file(tmp_path):
    sd = mixtral_state_dict()
    sd["model.layers.2.block_sparse_moe.experts.3.w2.weight"] = torch.full((H, I), float("nan"), dtype=torch.bfloat16)
    from moeoffload.errors import NonFiniteError

    with pytest.raises(NonFiniteError):
        table.build(sd, policy=0.3, mode="meanabs", progress=False, out=tmp_path / "s")
    assert not (tmp_path / "s" / table.PAYLOAD_FILE).exists()
    assert not (tmp_path / "s" / (table.PAYLOAD_FILE + ".tmp")).exists()
