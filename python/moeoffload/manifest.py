"""Structure checks of a table's ``manifest.json`` (see moeoffload.table).

``validate(manifest, path)`` checks a loaded manifest completely, before anything
uses it: every key present, of its type, in range, consistent with the others.
A broken manifest raises ``TableError`` (``MissingExpertError`` for an expert
absent from it) naming the field, e.g.

    manifest.json: experts[3].matrices[1].shape must be a list of non-negative integers

never KeyError, TypeError or AttributeError. What it cannot see (payload bytes,
checksums, each buffer's own header) is checked by the loader.
"""

from __future__ import annotations

import math

from .errors import MissingExpertError, TableError, TableVersionError

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes a value
DTYPES = tuple(ITEMSIZE)
MAX_VALUES = 2**62  # elements of one matrix: beyond this no index type holds them


class _Checker:
    def __init__(self, path):
        self.path = str(path)
        self.lossless = False

    def fail(self, field: str, what: str, cls=TableError):
        where = f"{field} " if field else ""
        return cls(f"{self.path}: {where}{what}")

    def obj(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a JSON object, got {_kind(value)}")
        return value

    def key(self, d: dict, name: str, field: str):
        if name not in d:
            raise self.fail(_join(field, name), "is missing")
        return d[name]

    def int_(self, value, field: str, lo: int = 0, hi: int | None = None, what: str | None = None) -> int:
        ok = _is_int(value) and value >= lo and (hi is None or value < hi)
        if not ok:
            if what is None:
                what = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
                if hi is not None:
                    what = f"an integer in [{lo}, {hi})"
            raise self.fail(field, f"must be {what}, got {_shown(value)}")
        return value

    def str_(self, value, field: str, choices=None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"must be a non-empty string, got {_shown(value)}")
        if choices is not None and value not in choices:
            raise self.fail(field, f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}")
        return value

    def bound(self, value, field: str) -> float:
        if self.lossless:  # codec "none": the bytes are the weights, the bound is 0
            if not (_is_number(value) and value == 0):
                raise self.fail(field, f"must be 0 (codec 'none' stores the weights exactly), got {_shown(value)}")
            return 0.0
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise self.fail(field, f"must be a positive finite number, got {_shown(value)}")
        return float(value)

    def list_(self, value, field: str, nonempty: bool = True) -> list:
        if not isinstance(value, list) or (nonempty and not value):
            raise self.fail(field, f"must be a {'non-empty ' if nonempty else ''}list, got {_shown(value)}")
        return value


def validate(manifest, path) -> None:
    """Raise TableError naming the first field of `manifest` (a parsed manifest.json) that is missing,
    of the wrong type, out of range or inconsistent; `path` names the file in the message."""
    from .policy import MODES
    from .table import ALIGN, FORMAT, TABLE_CODECS, VERSION

    c = _Checker(path)
    m = c.obj(manifest, "")
    if "format" not in m:
        raise c.fail("format", "is missing: this is not a moeoffload table manifest")
    if m["format"] != FORMAT:
        raise c.fail("", f"is not a moeoffload table manifest (format {_shown(m.get('format'))}, expected {FORMAT!r})")
    version = c.key(m, "version", "")
    if not _is_int(version) or version != VERSION:
        raise c.fail("", f"table format version {_shown(version)} is not supported (this build reads {VERSION}); "
                         "rebuild the table with this moeoffload: moeoffload.table.build(checkpoint, policy).save(path)",
                     cls=TableVersionError)

    model = c.obj(c.key(m, "model", ""), "model")
    c.str_(c.key(model, "id", "model"), "model.id")
    c.str_(c.key(model, "fingerprint", "model"), "model.fingerprint")
    if "weights" in model:  # (tables before 2026-12-03 lack it)
        c.str_(model["weights"], "model.weights")
    codec = c.str_(c.key(m, "codec", ""), "codec", TABLE_CODECS)
    c.lossless = codec == "none"
    L = c.int_(c.key(m, "num_layers", ""), "num_layers", lo=1)
    E = c.int_(c.key(m, "experts_per_layer", ""), "experts_per_layer", lo=1)

    model_layers = c.list_(c.key(m, "model_layers", ""), "model_layers")
    for i, v in enumerate(model_layers):
        c.int_(v, f"model_layers[{i}]")
    if len(model_layers) != L:
        raise c.fail("model_layers", f"lists {len(model_layers)} layers, num_layers is {L}")
    if len(set(model_layers)) != L:
        raise c.fail("model_layers", "lists a layer twice")

    names = c.list_(c.key(m, "matrices", ""), "matrices")
    for i, v in enumerate(names):
        c.str_(v, f"matrices[{i}]")
    if len(set(names)) != len(names):
        raise c.fail("matrices", "names a matrix twice")

    bounds = c.obj(c.key(m, "bounds", ""), "bounds")
    c.str_(c.key(bounds, "mode", "bounds"), "bounds.mode", MODES)
    per_layer = c.list_(c.key(bounds, "per_layer", "bounds"), "bounds.per_layer")
    for i, v in enumerate(per_layer):
        c.bound(v, f"bounds.per_layer[{i}]")
    if len(per_layer) != L:
        raise c.fail("bounds.per_layer", f"lists {len(per_layer)} bounds, num_layers is {L}")

    experts = c.list_(c.key(m, "experts", ""), "experts")
    seen: dict[tuple[int, int], int] = {}
    tensors: dict[str, int] = {}
    for i, x in enumerate(experts):
        f = f"experts[{i}]"
        c.obj(x, f)
        layer = c.int_(c.key(x, "layer", f), f"{f}.layer", hi=L)
        expert = c.int_(c.key(x, "expert", f), f"{f}.expert", hi=E)
        if (layer, expert) in seen:
            raise c.fail(f, f"repeats layer {layer} expert {expert} (first at experts[{seen[(layer, expert)]}])")
        seen[(layer, expert)] = i
        tensor = c.str_(c.key(x, "tensor", f), f"{f}.tensor")
        if tensor in tensors:
            raise c.fail(f"{f}.tensor", f"{tensor!r} is also experts[{tensors[tensor]}]'s")
        tensors[tensor] = i
        size = c.int_(c.key(x, "bytes", f), f"{f}.bytes", lo=1)
        if codec == "szpe":  # the slot it takes once transcoded to szp
            c.int_(c.key(x, "resident_bytes", f), f"{f}.resident_bytes", lo=1)
        c.int_(c.key(x, "crc32", f), f"{f}.crc32", hi=2**32, what="a CRC32 (an integer in [0, 2**32))")
        _check_matrices(c, c.list_(c.key(x, "matrices", f), f"{f}.matrices"), f, size, names, ALIGN)

    if len(seen) != L * E:
        missing = next((l, e) for l in range(L) for e in range(E) if (l, e) not in seen)
        raise c.fail("", f"experts lists no layer {missing[0]} expert {missing[1]} "
                         f"({len(seen)} of {L} x {E} experts listed)", MissingExpertError)


def _check_matrices(c: _Checker, mats: list, f: str, size: int, names: list, align: int) -> None:
    spans = []
    seen: set[str] = set()
    for j, mat in enumerate(mats):
        g = f"{f}.matrices[{j}]"
        c.obj(mat, g)
        name = c.str_(c.key(mat, "name", g), f"{g}.name", names)
        if name in seen:
            raise c.fail(f"{g}.name", f"{name!r} appears twice in {f}")
        seen.add(name)
        shape = c.key(mat, "shape", g)
        if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape):
            raise c.fail(f"{g}.shape", f"must be a list of non-negative integers, got {_shown(shape)}")
        if len(shape) > 8:
            raise c.fail(f"{g}.shape", f"has {len(shape)} dimensions (at most 8)")
        numel = math.prod(shape)
        if numel > MAX_VALUES:
            raise c.fail(f"{g}.shape", f"{_shown(shape)} describes more than 2**62 values")
        dtype = c.str_(c.key(mat, "dtype", g), f"{g}.dtype", DTYPES)
        c.bound(c.key(mat, "eb", g), f"{g}.eb")
        offset = c.int_(c.key(mat, "offset", g), f"{g}.offset")
        if offset % align:
            raise c.fail(f"{g}.offset", f"must be a multiple of {align}, got {offset}")
        nbytes = c.int_(c.key(mat, "bytes", g), f"{g}.bytes", lo=1)
        if c.lossless and nbytes != numel * ITEMSIZE[dtype]:  # codec "none": the bytes are the values
            raise c.fail(f"{g}.bytes", f"is {nbytes}, but {_shown(shape)} {dtype} values take {numel * ITEMSIZE[dtype]} "
                                       "(codec 'none' stores them raw)")
        if offset + nbytes > size:
            raise c.fail(g, f"[offset, offset + bytes) = [{offset}, {offset + nbytes}) is outside the expert's "
                            f"{size} bytes")
        c.int_(c.key(mat, "n_exceptions", g), f"{g}.n_exceptions", hi=numel + 1,
               what=f"an integer in [0, {numel}] (the matrix's values)")
        if "source" in mat and not isinstance(mat["source"], str):
            raise c.fail(f"{g}.source", f"must be a string, got {_shown(mat['source'])}")
        if "index" in mat and mat["index"] is not None:
            c.int_(mat["index"], f"{g}.index", what="null or a non-negative integer")
        if "transposed" in mat and not isinstance(mat["transposed"], bool):  # read as a truth value
            raise c.fail(f"{g}.transposed", f"must be true or false, got {_shown(mat['transposed'])}")
        spans.append((offset, offset + nbytes, j))
    if seen != set(names):
        raise c.fail(f"{f}.matrices", f"has {sorted(seen)}, the table's matrices are {sorted(names)}")
    order = [mat["name"] for mat in mats]
    if order != list(names):  # the runtime and the ops index an expert's matrices by position
        raise c.fail(f"{f}.matrices", f"lists {order}, not in the order of the table's matrices {list(names)}")
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise c.fail(f"{f}.matrices[{b}]", f"overlaps {f}.matrices[{a}]")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _shown(v) -> str:
    """The value as JSON would spell it, cut short."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    try:
        s = repr(v)
    except ValueError:  # an int of more than 4300 digits
        s = f"an integer of {v.bit_length()} bits"
    return s if len(s) <= 60 else s[:45] + "..." + s[-10:]


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name
