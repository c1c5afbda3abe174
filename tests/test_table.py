"""Expert table: build -> save -> load -> every payload equal; named errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moeoffload import table
from moeoffload.errors import (ChecksumError, InvalidBoundError, MissingExpertError, NoMoeLayersError, TableError,
                               TableMismatchError)

from conftest import E, I, L, H, mixtral_state_dict  # noqa: E402


def test_build_save_load_every_payload_equal(tmp_path):
    sd = mixtral_state_dict()
    built = table.build(sd, policy={0: 0.5, 1: 0.1, 2: 0.5}, mode="meanabs", progress=False)
    assert built.num_layers == L and built.experts_per_layer == E and built.matrix_names == ["w1", "w2", "w3"]
    built.save(tmp_path / "t")
    with table.load(tmp_path / "t", backend="cpu", expect=sd) as loaded:
        assert loaded.store.mapped_bytes > 0
        assert loaded.pool.stats()["bytes_registered"] == loaded.store.mapped_bytes
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


def test_named_errors(tmp_path):
    sd = mixtral_state_dict()
    t = table.build(sd, policy=lambda layer: 0.01, progress=False)
    t.save(tmp_path / "t")
    with pytest.raises(TableMismatchError, match="another model"):
        table.load(tmp_path / "t", backend="cpu", expect=mixtral_state_dict(layers=2))
    other = dict(sd)
    other["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = torch.zeros(I + 1, H, dtype=torch.bfloat16)
    with pytest.raises(TableMismatchError):
        table.load(tmp_path / "t", backend="cpu", expect=other)

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
        table.load(tmp_path / "t", backend="cpu")
    table.load(tmp_path / "t", backend="cpu", verify=False).close()

    # An expert missing from the manifest.
    m = json.loads((tmp_path / "t" / table.MANIFEST_FILE).read_text())
    m["experts"] = m["experts"][:-1]
    (tmp_path / "t" / table.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(MissingExpertError):
        table.load(tmp_path / "t", backend="cpu")
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
