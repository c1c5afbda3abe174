"""A table's manifest.json against careless edits and hostile input: TableError naming the field, never
KeyError, TypeError or AttributeError (moeoffload.manifest.validate, wired into table.load)."""

import copy
import json
import math
import re
import shutil

import numpy as np
import pytest

from conftest import E, L, mixtral_state_dict
from moeoffload import manifest, table
from moeoffload.errors import ChecksumError, MissingExpertError, TableError

DELETE = object()
REPLACEMENTS = [DELETE, None, [], {}, "", "x", True, -1, 0, 1.5, 2**70, float("nan"), [1], {"a": 1}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved table (szp, 3 layers x 4 experts x 3 matrices) and its manifest."""
    path = tmp_path_factory.mktemp("tables") / "t"
    table.build(mixtral_state_dict(), policy=0.01, progress=False).save(path)
    return path, json.loads((path / table.MANIFEST_FILE).read_text())


@pytest.fixture
def scratch(saved, tmp_path):
    """A copy of the saved table whose manifest a test may rewrite."""
    path, good = saved
    dst = tmp_path / "t"
    shutil.copytree(path, dst)
    return dst, copy.deepcopy(good)


def write(path, doc) -> None:
    (path / table.MANIFEST_FILE).write_text(json.dumps(doc))


def load(path):
    table.load(path).close()


def paths(doc, prefix=""):
    """Every field of a JSON document as (path, parent, key): 'experts[3].matrices[1].shape[0]'."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for k, v in items:
        p = (f"{prefix}.{k}" if prefix else k) if isinstance(doc, dict) else f"{prefix}[{k}]"
        yield p, doc, k
        if isinstance(v, (dict, list)):
            yield from paths(v, p)


def category(path: str, original):
    if path.endswith(".index"):
        return "optional int"
    if isinstance(original, bool):
        return "bool"
    if isinstance(original, int):
        return "int"
    if isinstance(original, float):
        return "number"
    return type(original).__name__


def fits(cat: str, v) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    return {"int": is_int, "optional int": v is None or is_int, "str": isinstance(v, str),
            "number": is_int or isinstance(v, float), "list": isinstance(v, list), "dict": isinstance(v, dict)}[cat]


def plainly_wrong(path: str, cat: str, v) -> bool:
    """The replacement is wrong for the field whatever the rest of the manifest says."""
    if not fits(cat, v):
        return True
    if cat in ("int", "optional int") and v == -1:
        return True
    if cat == "number" and (not math.isfinite(v) or v <= 0):
        return True
    if cat == "str" and v == "" and not path.endswith(".source"):
        return True
    return cat in ("list", "dict") and not v


def named(path: str) -> str:
    """The name the error must mention for a plainly wrong value at `path`."""
    path = re.sub(r"\.shape\[\d+\]$", ".shape", path)  # a shape is checked as a whole
    return {"format": "format", "version": "version"}.get(path, path)


def test_the_saved_manifest_is_valid(saved):
    path, good = saved
    manifest.validate(good, path / table.MANIFEST_FILE)
    load(path)


def test_every_field_replaced_or_removed(saved):
    """validate() on every (field, replacement): TableError naming the field where the value is plainly wrong,
    and never an exception of another kind."""
    path, good = saved
    where = path / table.MANIFEST_FILE
    checked = 0
    for p, _, key in list(paths(good)):
        for new in REPLACEMENTS:
            doc = copy.deepcopy(good)
            parent = doc
            for part in re.findall(r"[^.\[\]]+", p)[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            original = parent[key]
            if new is DELETE:
                del parent[key]
            else:
                parent[key] = new
            optional = new is DELETE and isinstance(key, str) and key in ("source", "index", "weights")
            try:
                manifest.validate(doc, where)
            except TableError as e:
                msg = e.args[0]  # str() of MissingExpertError, a KeyError too, adds quotes
                assert msg.startswith(str(where)), msg
                if new is DELETE and isinstance(key, str):
                    assert f"{p} is missing" in msg, (p, msg)
                elif new is not DELETE and plainly_wrong(p, category(p, original), new):
                    assert named(p) in msg, (p, new, msg)
                checked += 1
                continue
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{p} = {new!r}: {type(e).__name__}: {e}")
            if new is DELETE:
                assert optional or isinstance(key, int), f"{p} removed: accepted"
            else:
                assert not plainly_wrong(p, category(p, original), new), f"{p} = {new!r}: accepted"
    assert checked > 2000


def test_field_errors_through_load(scratch):
    path, good = scratch
    cases = {
        "experts[3].matrices[1].shape": ("shape", "x"),
        "experts[3].matrices[1].dtype": ("dtype", "int8"),
        "experts[3].matrices[1].eb": ("eb", None),
        "experts[3].matrices[1].n_exceptions": ("n_exceptions", 10**9),
        "experts[5].crc32": ("crc32", -1),
        "experts[5].tensor": ("tensor", []),
        "experts[0].layer": ("layer", L),
        "experts[0].expert": ("expert", E),
    }
    for field, (key, value) in cases.items():
        doc = copy.deepcopy(good)
        parent = doc
        for part in re.findall(r"[^.\[\]]+", field)[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        parent[key] = value
        write(path, doc)
        with pytest.raises(TableError, match=re.escape(field)):
            load(path)
    write(path, good)
    load(path)


def test_top_level_keys_removed_through_load(scratch):
    path, good = scratch
    for key in good:
        doc = {k: v for k, v in good.items() if k != key}
        write(path, doc)
        with pytest.raises(TableError, match=key):
            load(path)


@pytest.mark.parametrize("value", [[], None, "manifest", 3, True, [{"format": "moeoffload-table"}]])
def test_json_that_is_not_an_object(scratch, value):
    path, _ = scratch
    write(path, value)
    with pytest.raises(TableError, match="JSON object|not a moeoffload table"):
        load(path)


@pytest.mark.parametrize("text", ["", "{", "[" * 100000 + "]" * 100000, '{"format": NaN', "\udcff"])
def test_text_that_is_not_json(scratch, text):
    path, _ = scratch
    (path / table.MANIFEST_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(TableError, match="JSON"):
        load(path)


def test_a_file_instead_of_a_folder(saved, tmp_path):
    path, _ = saved
    f = tmp_path / "table.json"
    f.write_text("{}")
    with pytest.raises(TableError, match="not a moeoffload table"):
        table.load(f)
    with pytest.raises(TableError, match="not a moeoffload table"):
        table.load(path / table.PAYLOAD_FILE)


def test_a_folder_instead_of_manifest_json(scratch):
    path, _ = scratch
    (path / table.MANIFEST_FILE).unlink()
    (path / table.MANIFEST_FILE).mkdir()
    with pytest.raises(TableError, match="not a moeoffload table"):
        load(path)


def test_format_and_version(scratch):
    path, good = scratch
    for value in ("moeoffload-tables", None, 1, ["moeoffload-table"]):
        write(path, dict(good, format=value))
        with pytest.raises(TableError, match="not a moeoffload table manifest"):
            load(path)
    for value in (1, 3, 0, "2", 2.0, True, None, []):
        write(path, dict(good, version=value))
        with pytest.raises(TableError, match="version"):
            load(path)


def test_offsets_altered(scratch):
    path, good = scratch
    x = good["experts"][4]
    first, last = x["matrices"][0], x["matrices"][-1]
    changes = [
        (0, first["offset"] + 1, "multiple of"),                 # not on the 256-byte grid
        (0, first["offset"] + table.ALIGN, "overlaps|outside"),  # onto the next matrix
        (len(x["matrices"]) - 1, last["offset"] + table.ALIGN, "outside"),
        (len(x["matrices"]) - 1, x["bytes"], "outside"),
        (0, 2**70, "outside"),
        (0, -table.ALIGN, "non-negative"),
        (1, first["offset"], "overlaps"),
    ]
    for j, offset, why in changes:
        doc = copy.deepcopy(good)
        doc["experts"][4]["matrices"][j]["offset"] = offset
        write(path, doc)
        with pytest.raises(TableError, match=f"experts\\[4\\]\\.matrices\\[\\d\\].*({why})") as e:
            load(path)
        assert "KeyError" not in repr(e.value)


def test_sizes_and_shapes_altered(scratch):
    path, good = scratch
    changes = [
        ("matrices", 0, "bytes", 10**6, "outside"),
        ("matrices", 0, "bytes", 0, "positive"),
        ("matrices", 0, "shape", [96, -64], "shape"),
        ("matrices", 0, "shape", [96.0, 64], "shape"),
        ("matrices", 0, "shape", [[96, 64]], "shape"),
        ("matrices", 0, "shape", [2**40, 2**40], "shape"),
        ("matrices", 0, "shape", [1] * 9, "shape"),
        ("matrices", 0, "shape", [], "shape"),
        ("matrices", 0, "n_exceptions", 96 * 64 + 1, "n_exceptions"),
        ("matrices", 0, "name", "w4", "name"),
        ("matrices", 1, "name", "w1", "name"),
        ("matrices", 0, "index", "0", "index"),
        ("matrices", 0, "source", 7, "source"),
        ("matrices", 0, "transposed", "no", "transposed"),
    ]
    for _, j, key, value, why in changes:
        doc = copy.deepcopy(good)
        doc["experts"][2]["matrices"][j][key] = value
        write(path, doc)
        with pytest.raises(TableError, match=f"experts\\[2\\]\\.matrices\\[{j}\\].*{why}"):
            load(path)


def test_a_raw_table_whose_matrix_sizes_disagree_with_their_shape_and_dtype(tmp_path):
    """Codec "none" stores the values raw: a matrix's bytes must be numel x itemsize of its dtype, or the
    load would reinterpret or overrun them (a torch error at the first decompress, before)."""
    path = tmp_path / "t"
    table.build(mixtral_state_dict(), policy=0.01, codec="none", progress=False).save(path)
    good = json.loads((path / table.MANIFEST_FILE).read_text())
    m = good["experts"][2]["matrices"][0]
    for key, value in (("dtype", "float32"), ("bytes", m["bytes"] - 2), ("shape", [m["shape"][0] * 2, m["shape"][1]])):
        doc = copy.deepcopy(good)
        doc["experts"][2]["matrices"][0][key] = value
        write(path, doc)
        with pytest.raises(TableError, match=r"experts\[2\]\.matrices\[0\]\.bytes.*stores them raw"):
            load(path)
    write(path, good)
    load(path)


def test_experts_duplicated_missing_or_out_of_range(scratch):
    path, good = scratch
    doc = copy.deepcopy(good)
    doc["experts"][7] = copy.deepcopy(doc["experts"][6])
    write(path, doc)
    with pytest.raises(TableError, match=r"experts\[7\]"):
        load(path)
    doc = copy.deepcopy(good)
    doc["experts"][7]["tensor"] = doc["experts"][6]["tensor"]
    write(path, doc)
    with pytest.raises(TableError, match=r"experts\[7\]\.tensor"):
        load(path)
    doc = copy.deepcopy(good)
    del doc["experts"][5]
    write(path, doc)
    with pytest.raises(MissingExpertError, match="layer 1 expert 1"):
        load(path)
    for key, value in (("layer", -1), ("layer", L), ("expert", E), ("expert", 2**64)):
        doc = copy.deepcopy(good)
        doc["experts"][0][key] = value
        write(path, doc)
        with pytest.raises(TableError, match=rf"experts\[0\]\.{key}"):
            load(path)


def test_matrices_listed_out_of_order(scratch):
    """The runtime and the ops index an expert's matrices by position (table.matrix_names): a list in
    another order (the table's, or one expert's) would compute with the wrong matrix, so it is refused."""
    path, good = scratch
    doc = copy.deepcopy(good)
    doc["matrices"] = doc["matrices"][::-1]
    write(path, doc)
    with pytest.raises(TableError, match=r"experts\[0\]\.matrices.*not in the order"):
        load(path)
    doc = copy.deepcopy(good)
    doc["experts"][5]["matrices"] = doc["experts"][5]["matrices"][::-1]
    write(path, doc)
    with pytest.raises(TableError, match=r"experts\[5\]\.matrices.*not in the order"):
        load(path)


def test_counts_that_disagree(scratch):
    path, good = scratch
    for key, value, name in (("num_layers", L + 1, "model_layers"), ("num_layers", 0, "num_layers"),
                             ("experts_per_layer", E - 1, r"experts\[\d+\]\.expert"),
                             ("experts_per_layer", E + 1, "lists no layer"), ("model_layers", [0, 1], "model_layers"),
                             ("model_layers", [0, 0, 1], "model_layers"), ("matrices", ["w1", "w2"], "matrices"),
                             ("matrices", ["w1", "w2", "w3", "w3"], "matrices")):
        write(path, dict(good, **{key: value}))
        with pytest.raises(TableError, match=name):
            load(path)
    doc = copy.deepcopy(good)
    doc["bounds"]["per_layer"] = doc["bounds"]["per_layer"][:-1]
    write(path, doc)
    with pytest.raises(TableError, match=r"bounds\.per_layer"):
        load(path)


def test_payload_dtype_message_says_what_differs(scratch):
    """A payload tensor of the right size but not bytes: the message names the dtype, not 'N bytes vs N'."""
    from safetensors.numpy import load_file, save_file

    path, good = scratch
    tensors = load_file(str(path / table.PAYLOAD_FILE))
    tensors["0.1"] = tensors["0.1"].view(np.int8)
    save_file(tensors, str(path / table.PAYLOAD_FILE))
    with pytest.raises(ChecksumError) as e:
        load(path)
    msg = str(e.value)
    assert "dtype I8" in msg and "'0.1'" in msg
    assert not re.search(r"holds (\d+) bytes, the manifest says \1\b", msg)


def test_payload_size_message_still_gives_both_sizes(scratch):
    path, good = scratch
    doc = copy.deepcopy(good)
    doc["experts"][1]["bytes"] += table.ALIGN  # structurally fine (the last matrix ends inside), not the file's
    write(path, doc)
    with pytest.raises(ChecksumError, match=rf"holds {good['experts'][1]['bytes']} bytes where the manifest says "
                                            rf"{good['experts'][1]['bytes'] + table.ALIGN}"):
        load(path)
