"""The compressed expert table: build from a checkpoint, save, load.

    table = moeoffload.table.build("path/to/hf-checkpoint", policy=0.02, mode="meanabs")
    table.save("experts.table")
    table = moeoffload.table.load("experts.table")      # payloads stay in the file (mode="copy" reads them in)
    w1 = table.decompress(layer=3, expert=5, matrix="w1")

On disk a table is a directory: ``experts.safetensors`` holds one uint8 tensor
per expert (``"<layer>.<expert>"``: its matrices' compressed buffers back to
back, each starting on a 256-byte boundary) and ``manifest.json`` says what is
where (model fingerprint, a digest of the experts' weights, layers, experts,
matrix names, shapes, dtypes, codec, bounds, CRC32 of every payload).

Expert matrices are found by name, in both layouts transformers uses:
per-expert keys (``...layers.N.block_sparse_moe.experts.E.w1.weight``,
``...layers.N.mlp.experts.E.gate_proj.weight``) and fused 3-D parameters
(``...layers.N.mlp.experts.gate_up_proj`` [E, 2I, H]). Layers are numbered
0..L-1 over the MoE layers in order; the model's own layer numbers are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import re
import struct
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _native
from . import manifest as _manifest
from .codec import CompressedTensor, absolute_bound, compress
from .errors import (ChecksumError, ClosedError, CodecError, InvalidArgumentError, InvalidBoundError,
                     MissingExpertError, NoMoeLayersError, TableChangedError, TableError, TableMismatchError,
                     UnsupportedDtypeError)
from .policy import BoundPolicy, no_repeated_keys

FORMAT = "moeoffload-table"
VERSION = 2  # 2: payloads in szp format v2 (version-1 tables hold szp v1 buffers: rebuild them)
PAYLOAD_FILE = "experts.safetensors"
MANIFEST_FILE = "manifest.json"
HISTORY_FILE = "activations.npy"
ALIGN = 256
TABLE_CODECS = ("szp", "szpe", "sz3", "none")  # "none": the raw weights, the uncompressed baseline and the lossless check
# Codecs whose experts sit in the device cache as szp, what the fused kernels read: szp as stored, and
# szpe (entropy coded in host memory and over the bus) transcoded into szp on arrival.
FUSED_CODECS = ("szp", "szpe")

_PER_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\..*experts)\.(?P<expert>\d+)\.(?P<matrix>.+?)(?:\.weight)?$")
_FUSED = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\..*experts)\.(?P<matrix>[A-Za-z_0-9]+?)(?:\.weight)?$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class MatrixRef:
    """Where one expert matrix lives in the source."""

    model_layer: int
    expert: int
    name: str
    key: str
    index: int | None  # the expert's index into a fused [E, ...] parameter
    shape: tuple[int, ...]
    dtype: torch.dtype


def find_expert_matrices(shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[tuple[int, int], list[MatrixRef]]:
    """Group a model's expert matrices by (model layer, expert) from names and shapes."""
    found: dict[tuple[int, int], list[MatrixRef]] = defaultdict(list)
    for key, (shape, dtype) in shapes.items():
        m = _PER_EXPERT.match(key)
        if m and len(shape) == 2:
            found[(int(m["layer"]), int(m["expert"]))].append(
                MatrixRef(int(m["layer"]), int(m["expert"]), m["matrix"], key, None, tuple(shape), dtype))
            continue
        m = _FUSED.match(key)
        if m and len(shape) == 3 and not m["matrix"].isdigit():
            for e in range(shape[0]):
                found[(int(m["layer"]), e)].append(
                    MatrixRef(int(m["layer"]), e, m["matrix"], key, e, tuple(shape[1:]), dtype))
    for refs in found.values():
        refs.sort(key=lambda r: r.name)
    return dict(found)


class _Source:
    """Tensors by name from a state_dict or a safetensors checkpoint directory, one at a time."""

    def __init__(self, source):
        self._dict = None
        self._files: dict[str, Path] = {}
        if isinstance(source, Mapping):
            self._dict = source
            self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in source.items() if isinstance(v, torch.Tensor)}
            self.model_id = "state_dict"
            return
        path = Path(source)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise TableError(f"{source} is neither a state_dict nor a directory with .safetensors files")
        self.model_id = path.resolve().name
        self.shapes = {}
        for f in files:
            for key, (dtype, shape) in _safetensors_header(f)[0].items():
                self.shapes[key] = (tuple(shape), _SAFETENSORS_DTYPES.get(dtype, dtype))  # (F64 etc. by name)
                self._files[key] = f

    def is_meta(self, refs: list[MatrixRef]) -> bool:
        return self._dict is not None and any(getattr(self._dict[r.key], "is_meta", False) for r in refs)

    def row_digests(self, refs: list[MatrixRef]) -> list[bytes]:
        """_row_digest of each matrix's first row (all of a 1-D one), as _head() takes it from get(): from a
        checkpoint only those bytes are read, each file opened once."""
        if self._dict is not None:
            return [_row_digest(_head(self.get(r))) for r in refs]
        from safetensors import safe_open

        out: list = [None] * len(refs)
        by_file: dict[Path, list[int]] = {}
        for i, r in enumerate(refs):
            by_file.setdefault(self._files[r.key], []).append(i)
        for f, idx in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for i in idx:
                    r = refs[i]
                    ndim = len(self.shapes[r.key][0]) - (r.index is not None)
                    at = ((slice(r.index, r.index + 1),) if r.index is not None else ()) + \
                         ((slice(0, 1),) if ndim >= 2 else ())
                    out[i] = _row_digest(st.get_slice(r.key)[at] if at else st.get_tensor(r.key))
        return out

    def get(self, ref: MatrixRef) -> torch.Tensor:
        if self._dict is not None:
            t = self._dict[ref.key].detach()
            return (t[ref.index] if ref.index is not None else t).contiguous()
        from safetensors import safe_open

        with safe_open(str(self._files[ref.key]), framework="pt") as f:
            t = f.get_slice(ref.key)[ref.index] if ref.index is not None else f.get_tensor(ref.key)
        return t.contiguous()


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint directory, from the files' headers alone (TableError
    when a file is not a whole safetensors file)."""
    return {key: shape for key, (shape, _) in _Source(path).shapes.items()}


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[int, int]], tuple]:
    """(name -> (dtype, shape), name -> absolute (begin, end) in the file, the file's _file_id).

    Any header that is not a safetensors header of tensors inside the file is a TableError naming what is wrong."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise TableError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise TableError(f"{path} has an implausible safetensors header of {n} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise TableError(f"{path} has a corrupt safetensors header: {e}") from e
        st = os.fstat(f.fileno())
        size = st.st_size
    if not isinstance(header, dict):
        raise TableError(f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    meta, spans = {}, {}
    for k, v in header.items():
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
              and all(_is_int(d) and d >= 0 for d in v["shape"])
              and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
              and 0 <= offsets[0] <= offsets[1] <= size - 8 - n)
        if not ok:
            raise TableError(f"{path} has a corrupt safetensors header: tensor {k!r} needs a dtype, a shape and "
                             f"data_offsets [begin, end] inside the file's {max(size - 8 - n, 0)} data bytes, got {v!r:.200}")
        meta[k] = (v["dtype"], v["shape"])
        spans[k] = (8 + n + offsets[0], 8 + n + offsets[1])
    return meta, spans, _file_id(st)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _head(t: torch.Tensor) -> torch.Tensor:
    """A matrix's first row (a 1-D one whole), flat: what weights_digest hashes of it."""
    return (t[0] if t.dim() >= 2 else t).reshape(-1)


def _row_digest(row: torch.Tensor) -> bytes:
    """(Its bytes in memory order: a [1, 1, C] slice and a [C] row hash alike.)"""
    return hashlib.blake2b(row.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).digest()


def weights_digest(rows: dict[tuple[int, int, str], bytes]) -> str:
    """Tells apart two models of one layout (a fine-tune and its base): a hash of the first row of every
    expert matrix (_row_digest of _head), by (model layer, expert, matrix name), as the checkpoint or
    state_dict holds them."""
    h = hashlib.sha256()
    for key in sorted(rows):
        h.update(f"{key}\n".encode() + rows[key])
    return h.hexdigest()[:32]


def _source_digest(source: _Source, grid) -> str | None:
    """weights_digest of a source's experts; None when it has no values to hash (meta tensors: a model
    offloaded already, or built on the meta device), so only its layout can be checked."""
    keys = [(l, e, r.name) for (l, e), refs in grid.items() for r in refs]
    refs = [r for refs in grid.values() for r in refs]
    if source.is_meta(refs):
        return None
    return weights_digest(dict(zip(keys, source.row_digests(refs))))


def fingerprint(grid: dict[tuple[int, int], list[MatrixRef]]) -> str:
    """Identifies a model's expert layout: names, shapes and dtypes of every expert matrix."""
    h = hashlib.sha256()
    for (layer, expert) in sorted(grid):
        for r in grid[(layer, expert)]:
            h.update(f"{layer}/{expert}/{r.name}/{r.shape}/{r.dtype}\n".encode())
    return h.hexdigest()[:32]


def _grid_of(source: _Source) -> tuple[dict, list[int], int]:
    grid = find_expert_matrices(source.shapes)
    if not grid:
        raise NoMoeLayersError("no expert matrices found (looked for '...layers.N....experts.E.<name>' and fused "
                               "'...layers.N....experts.<name>' [E, ...] parameters)")
    layers = sorted({l for l, _ in grid})
    n_exp = 1 + max(e for _, e in grid)
    names = [r.name for r in grid[next(iter(grid))]]
    for l in layers:
        for e in range(n_exp):
            if (l, e) not in grid:
                raise MissingExpertError(f"model layer {l} has no expert {e} (the largest expert index is {n_exp - 1})")
            if [r.name for r in grid[(l, e)]] != names:
                raise MissingExpertError(f"layer {l} expert {e} has matrices {[r.name for r in grid[(l, e)]]}, "
                                         f"expected {names}")
    return grid, layers, n_exp


class ExpertTable:
    """A compressed expert table: plain data, a manifest and its payload bytes.

    ``mode`` says where the payloads are: "memory" (built, not saved yet), "copy"
    (read into private host memory at load: later changes to the files do not
    matter), or "map" (left in the file and read on demand, checked each time:
    a file changed on disk raises TableChangedError). The table builds no runtime
    objects: an ExpertCache makes its own pinned store from it (mapping the file
    in place for "map", copying the bytes otherwise)."""

    def __init__(self, manifest: dict, payloads: dict[str, np.ndarray] | None = None, path: Path | None = None,
                 spans: dict[str, tuple[int, int]] | None = None, mode: str = "memory"):
        self.manifest = manifest
        self._payloads = payloads
        self.path = path
        self.spans = spans  # where each payload lies in the payload file (loaded tables)
        self.mode = mode
        self._file = None
        self._file_id = None
        self._closed = False
        self._by_key = {(x["layer"], x["expert"]): x for x in manifest["experts"]}
        self._L, self._E = manifest["num_layers"], manifest["experts_per_layer"]  # expert_id is per layer call

    def _open_file(self) -> None:
        """Open the payload file for on-demand reads ("map" mode), remembering what it was."""
        self._file = open(self.path / PAYLOAD_FILE, "rb")
        self._file_id = _file_id(os.fstat(self._file.fileno()))

    def _read(self, begin: int, n: int) -> np.ndarray:
        """n bytes of the payload file at begin, private to the caller; TableChangedError when the file changed."""
        fd = self._file.fileno()
        if _file_id(os.fstat(fd)) != self._file_id:
            raise TableChangedError(f"{self.path / PAYLOAD_FILE} changed on disk since the table was loaded: "
                                    "load it again (or load with mode='copy' to be independent of the file)")
        data = os.pread(fd, n, begin)
        if len(data) != n:
            raise TableChangedError(f"{self.path / PAYLOAD_FILE} is shorter than when it was loaded: load it again")
        return np.frombuffer(data, dtype=np.uint8)

    @property
    def file_identity(self) -> tuple[int, int, int, int] | None:
        """(st_dev, st_ino, st_size, st_mtime_ns) of the payload file as loaded ("map" mode; else None): an
        ExpertCache maps the file again and refuses one that is not this one, unchanged."""
        return self._file_id

    # ---- what is in it ----
    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def experts_per_layer(self) -> int:
        return self.manifest["experts_per_layer"]

    @property
    def matrix_names(self) -> list[str]:
        return self.manifest["matrices"]

    def expert_id(self, layer: int, expert: int) -> int:
        """The flat id of (layer, expert): layer x experts_per_layer + expert, each an integer in range."""
        L, E = self._L, self._E
        if type(layer) is int and type(expert) is int and 0 <= layer < L and 0 <= expert < E:
            return layer * E + expert
        for name, v, n in (("layer", layer, L), ("expert", expert, E)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise InvalidArgumentError(f"{name} {v!r} is not an integer")
            if not 0 <= v < n:
                raise InvalidArgumentError(f"{name} {v!r} is out of range: the table has {L} layers of {E} experts")
        return int(layer) * E + int(expert)

    def entry(self, layer: int, expert: int) -> dict:
        if isinstance(layer, bool) or isinstance(expert, bool) or not isinstance(layer, numbers.Integral) \
                or not isinstance(expert, numbers.Integral):  # True == 1 and 0.0 == 0 as keys
            raise InvalidArgumentError(f"layer and expert are integers, got {layer!r} and {expert!r}")
        try:
            return self._by_key[(int(layer), int(expert))]
        except KeyError:
            raise MissingExpertError(f"the table has no layer {layer} expert {expert}") from None

    def expert_bytes(self) -> np.ndarray:
        """Payload bytes per expert id."""
        out = np.zeros(self.num_layers * self.experts_per_layer, dtype=np.int64)
        for x in self.manifest["experts"]:
            out[self.expert_id(x["layer"], x["expert"])] = x["bytes"]
        return out

    def resident_bytes(self) -> np.ndarray:
        """Device cache bytes per expert id: the payload's, or for szpe the szp buffers it transcodes to."""
        out = self.expert_bytes()
        for x in self.manifest["experts"]:
            if "resident_bytes" in x:
                out[self.expert_id(x["layer"], x["expert"])] = x["resident_bytes"]
        return out

    def bits_per_weight(self) -> float:
        """Payload bits per weight, padding included."""
        weights = sum(int(np.prod(m["shape"])) for x in self.manifest["experts"] for m in x["matrices"])
        return 8.0 * sum(x["bytes"] for x in self.manifest["experts"]) / weights

    def payload(self, layer: int, expert: int) -> np.ndarray:
        """The expert's compressed bytes (read-only; for a mapped table a private copy read now)."""
        x = self.entry(layer, expert)
        if self._closed:
            raise ClosedError("the table is closed")
        if self._payloads is not None:
            return self._payloads[x["tensor"]]
        begin, end = self.spans[x["tensor"]]
        return self._read(begin, end - begin)

    def matrix_entry(self, layer: int, expert: int, matrix: str) -> dict:
        """The manifest's record of one matrix: offset and bytes in the payload, shape, dtype, eb."""
        for m in self.entry(layer, expert)["matrices"]:
            if m["name"] == matrix:
                return m
        raise MissingExpertError(f"layer {layer} expert {expert} has no matrix {matrix!r} (it has {self.matrix_names})")

    def compressed(self, layer: int, expert: int, matrix: str) -> CompressedTensor:
        if self.manifest["codec"] == "none":
            raise UnsupportedDtypeError("this table stores raw weights (codec 'none'): use decompress()")
        m = self.matrix_entry(layer, expert, matrix)
        blob = self.payload(layer, expert)
        return CompressedTensor.from_bytes(blob[m["offset"] : m["offset"] + m["bytes"]])

    def decompress(self, layer: int, expert: int, matrix: str, dtype=None, device=None) -> torch.Tensor:
        """The matrix as stored ([out, in]; see the manifest's "transposed")."""
        if self.manifest["codec"] != "none":
            return self.compressed(layer, expert, matrix).decompress(dtype=dtype, device=device)
        m = self.matrix_entry(layer, expert, matrix)
        raw = self.payload(layer, expert)[m["offset"] : m["offset"] + m["bytes"]]
        w = torch.from_numpy(np.array(raw)).view(getattr(torch, m["dtype"])).reshape(m["shape"])  # one copy
        return w.to(dtype=dtype or w.dtype, device=device)

    # ---- checks ----
    def check_matches(self, source) -> None:
        """Raise TableMismatchError unless `source` (state_dict or checkpoint dir) is the table's model."""
        src = _Source(source)
        grid, _, _ = _grid_of(src)
        fp = fingerprint(grid)
        if fp != self.manifest["model"]["fingerprint"]:
            raise TableMismatchError(
                f"this table was built from another model (expert layout fingerprint {self.manifest['model']['fingerprint']}, "
                f"model {self.manifest['model']['id']!r}); the given model has fingerprint {fp}: rebuild the table")
        want = self.manifest["model"].get("weights")  # (tables before 2026-12-03 lack it)
        got = None if want is None else _source_digest(src, grid)
        if got is not None and got != want:
            raise TableMismatchError(
                f"this table holds the experts of other weights of the same layout (built from "
                f"{self.manifest['model']['id']!r}: a base model and its fine-tune, say): rebuild it from this model")

    def verify(self) -> None:
        """Check every payload against its CRC32; raise ChecksumError on the first mismatch."""
        for x in self.manifest["experts"]:
            got = _native.crc32(np.ascontiguousarray(self.payload(x["layer"], x["expert"])))
            if got != x["crc32"]:
                raise ChecksumError(f"payload of layer {x['layer']} expert {x['expert']} has CRC32 {got:#010x}, "
                                    f"the manifest says {x['crc32']:#010x}: the table file is corrupt")

    # ---- persistence ----
    def save(self, path, history=None) -> Path:
        """Write the table directory (and, when given, an ActivationHistory or [N, L, E] array of past matrices;
        without one, a history a table saved there before is removed: it was that table's)."""
        if self.mode != "memory":
            raise TableError("this table is loaded from disk already; copy its directory instead")
        hist = None if history is None else history_matrices(history, self.num_layers, self.experts_per_layer)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        writer = _PayloadWriter(path / PAYLOAD_FILE, list(self._payloads))
        for name, blob in self._payloads.items():
            writer.add(name, blob)
        writer.finish()
        _write_manifest(path, self.manifest, hist)
        self.path = path
        return path

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the payloads (copy mode) or the open file (map mode). Caches made from the table keep their own."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.mode != "memory":
            self._payloads = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ExpertTable(mode={self.mode!r}, model={m['model']['id']!r}, layers={m['num_layers']}, experts={m['experts_per_layer']}, "
                f"codec={m['codec']!r}, bits/weight={self.bits_per_weight():.3f})")


# Per-expert checkpoint names -> the fused matrices transformers 5 experts modules hold (gate rows, then up).
_FUSED_LAYOUTS = (
    ({"w1", "w2", "w3"}, [("down_proj", ("w2",)), ("gate_up_proj", ("w1", "w3"))]),
    ({"gate_proj", "up_proj", "down_proj"}, [("down_proj", ("down_proj",)), ("gate_up_proj", ("gate_proj", "up_proj"))]),
)


def _stored_matrices(refs: list[MatrixRef], fuse: bool) -> list[tuple[str, list[MatrixRef]]]:
    """(name, source matrices) of each matrix the table stores for one expert. With fuse, as a transformers 5
    experts module holds them: per-expert w1/w3 (or gate/up) become one gate_up_proj [2I, H]; already fused
    or unknown layouts stay as they are."""
    by_name = {r.name: r for r in refs}
    for names, layout in _FUSED_LAYOUTS if fuse else ():
        if set(by_name) == names:
            return [(name, [by_name[n] for n in parts]) for name, parts in layout]
    return [(r.name, [r]) for r in refs]


class _PayloadWriter:
    """Writes experts.safetensors one payload at a time (a safetensors file of U8 tensors, readable by the
    safetensors package too): room for the header is reserved first and the header written last, padded
    with spaces as safetensors pads its own, so no payload stays in memory once written."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        widest = 10**15  # offsets of up to 16 digits: a 1 PB file
        self.reserve = len(self._header({n: (widest, widest) for n in names})) + 7 & ~7
        self.file = open(self.tmp, "wb")
        self.file.write(bytes(8 + self.reserve))
        self.spans: dict[str, tuple[int, int]] = {}
        self.offset = 0

    @staticmethod
    def _header(spans) -> bytes:
        return json.dumps({n: {"dtype": "U8", "shape": [b - a], "data_offsets": [a, b]} for n, (a, b) in spans.items()},
                          separators=(",", ":")).encode()

    def add(self, name: str, blob: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(blob)))
        self.spans[name] = (self.offset, self.offset + blob.size)
        self.offset += blob.size

    def finish(self) -> None:
        header = self._header(self.spans)
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
        self.file.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


_TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build(source, policy=None, codec: str = "szp", *, mode: str | None = None, model_id: str | None = None,
          progress: bool = True, transpose: bool = False, fuse: bool = False, out=None, history=None) -> ExpertTable:
    """Compress every expert matrix of a model into an ExpertTable: in memory, or with ``out`` a table
    directory written as it goes (each payload streamed to disk, none held; returns it loaded, mode "map").

    source: a state_dict or a Hugging Face checkpoint directory (read tensor by tensor).
    policy: the bound per MoE layer: a float, {layer: bound}, a callable, or a
        ``moeoffload policy`` JSON (see moeoffload.policy); layers are the MoE
        layer positions 0..L-1. mode: "abs", "rel" or "meanabs" (overrides the policy's).
        Not used by codec "none" (the raw weights: the uncompressed baseline, bit-exact).
    fuse: store per-expert w1/w3 (or gate_proj/up_proj) as one gate_up_proj [2I, H], the layout of the
        transformers 5 experts modules that offload() serves (from_pretrained on older checkpoints).
    transpose: store each matrix transposed ([in, out] storage as GPT-OSS keeps it becomes the
        [out, in] the fused kernels read); the manifest marks such matrices "transposed".
    """
    if codec not in TABLE_CODECS:
        raise UnsupportedDtypeError(f"codec must be one of {TABLE_CODECS}, got {codec!r}")
    from tqdm.auto import tqdm

    src = _Source(source)
    grid, model_layers, n_exp = _grid_of(src)
    hist = None if history is None else history_matrices(history, len(model_layers), n_exp)  # before any writing
    if codec == "none":
        pol, bounds = BoundPolicy(mode="abs"), [0.0] * len(model_layers)
    else:
        if policy is None:
            raise InvalidBoundError(f"codec {codec!r} needs a policy: the error bound per MoE layer")
        pol = BoundPolicy.from_any(policy, mode)
        bounds = [pol.bound(i) for i in range(len(model_layers))]
    odd = next((r for refs in grid.values() for r in refs if r.dtype not in _TABLE_DTYPES), None)
    if odd is not None:  # before anything is written: a table load() refuses, or a compress failing midway
        raise UnsupportedDtypeError(f"expert matrix {odd.key!r} is {str(odd.dtype).replace('torch.', '')}: a table "
                                    "stores float32, bfloat16 or float16 experts (cast the model first)")
    first = grid[(model_layers[0], 0)]
    names = [n for n, _ in _stored_matrices(first, fuse)]
    payloads: dict[str, np.ndarray] = {}
    writer = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        writer = _PayloadWriter(Path(out) / PAYLOAD_FILE, [f"{i}.{e}" for i in range(len(model_layers))
                                                           for e in range(n_exp)])
    experts, rows = [], {}
    bar = tqdm(total=len(grid), desc="compressing experts", unit="expert", disable=not progress)
    try:
        for i, ml in enumerate(model_layers):
            for e in range(n_exp):
                parts, mats, offset, resident = [], [], 0, 0
                for name, refs in _stored_matrices(grid[(ml, e)], fuse):
                    got = [src.get(r) for r in refs]
                    rows.update({(ml, e, r.name): _row_digest(_head(t)) for r, t in zip(refs, got)})
                    w = torch.cat(got) if len(got) > 1 else got[0]
                    ref = dataclasses.replace(refs[0], name=name, shape=tuple(w.shape))
                    if transpose and len(ref.shape) == 2:
                        w, ref = w.T.contiguous(), dataclasses.replace(ref, shape=ref.shape[::-1])
                    if codec == "none":
                        # (a model on cuda hands over cuda tensors: the table is host bytes)
                        buf = w.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
                        eb, n_exceptions = 0.0, 0
                    else:
                        try:
                            eb = absolute_bound(w, bounds[i], pol.mode)
                            ct = compress(w, eb, mode="abs", codec=codec)
                        except CodecError as err:  # which matrix of the model (NaN weights, a bound too small)
                            raise type(err)(f"expert matrix {ref.key!r}"
                                            f"{'' if ref.index is None else f' [{ref.index}]'}: {err}") from None
                        n_exceptions, buf = ct.n_exceptions, ct.buffer
                        if codec == "szpe":  # its slot holds the szp buffers, laid out as the store lays them
                            resident = _resident_end(resident, _native.szpe_inspect(buf, False)["szp_total_bytes"])
                    pad = (-buf.size) % ALIGN
                    parts.extend([buf, np.zeros(pad, np.uint8)])
                    mats.append({"name": ref.name, "source": ref.key, "index": ref.index, "shape": list(ref.shape),
                                 "dtype": str(ref.dtype).replace("torch.", ""), "eb": eb, "offset": offset,
                                 "bytes": int(buf.size), "n_exceptions": n_exceptions,
                                 **({"transposed": True} if transpose else {})})
                    offset += buf.size + pad
                blob = np.concatenate(parts)
                tensor = f"{i}.{e}"
                if writer is not None:
                    writer.add(tensor, blob)
                else:
                    payloads[tensor] = blob
                experts.append({"layer": i, "expert": e, "tensor": tensor, "bytes": int(blob.size),
                                "crc32": int(_native.crc32(blob)), "matrices": mats,
                                **({"resident_bytes": resident} if codec == "szpe" else {})})
                bar.update(1)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    manifest = {
        "format": FORMAT, "version": VERSION,
        "model": {"id": model_id or src.model_id, "fingerprint": fingerprint(grid), "weights": weights_digest(rows)},
        "codec": codec, "num_layers": len(model_layers), "experts_per_layer": n_exp,
        "model_layers": model_layers, "matrices": names,
        "bounds": {"mode": pol.mode, "per_layer": bounds},
        "experts": experts,
    }
    if writer is None:
        return ExpertTable(manifest, payloads)
    writer.finish()
    _write_manifest(Path(out), manifest, hist)
    return load(out, verify=False)


def _resident_end(end: int, nbytes: int) -> int:
    """Where the next szp buffer of an szpe expert's slot ends (ExpertStore::set_matrices's layout)."""
    return -(-end // _native.RESIDENT_ALIGN) * _native.RESIDENT_ALIGN + int(nbytes)


LOAD_MODES = ("map", "copy")


def load(path, *, mode: str = "map", verify: bool = True, expect=None) -> ExpertTable:
    """Load a saved table.

    mode: "map" leaves the payloads in the file (no memory held; read on demand,
    and an ExpertCache maps the file and pins it in place: no second copy); a
    change to the file on disk is detected before each read and raises
    TableChangedError. "copy" reads every payload into private memory now: the
    table (and caches made from it) no longer depend on the files.
    verify: check every payload's CRC32 (ChecksumError). expect: a state_dict
    or checkpoint directory the table must have been built from (TableMismatchError).
    """
    if mode not in LOAD_MODES:
        raise InvalidArgumentError(f"unknown load mode {mode!r}: use one of {LOAD_MODES}")
    path = Path(path).absolute()  # a cache maps the file by this path: a chdir in between must not change it
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(), object_pairs_hook=no_repeated_keys)
    except FileNotFoundError:
        raise TableError(f"{path} is not a moeoffload table (no {MANIFEST_FILE})") from None
    except OSError as e:  # the table path is a file, manifest.json a directory, unreadable, ...
        raise TableError(f"{path} is not a moeoffload table (cannot read {MANIFEST_FILE}: {e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise TableError(f"{path / MANIFEST_FILE} is not valid JSON: {e}") from e
    _manifest.validate(manifest, path / MANIFEST_FILE)
    L, E = manifest["num_layers"], manifest["experts_per_layer"]
    have = {(x["layer"], x["expert"]) for x in manifest["experts"]}
    for l in range(L):
        for e in range(E):
            if (l, e) not in have:
                raise MissingExpertError(f"the table manifest lists no layer {l} expert {e}")
    payload_file = path / PAYLOAD_FILE
    if not payload_file.is_file():
        raise TableError(f"{payload_file} is missing")
    meta, spans, parsed = _safetensors_header(payload_file)
    for x in manifest["experts"]:
        if x["tensor"] not in spans:
            raise MissingExpertError(f"{payload_file} has no tensor {x['tensor']!r} (layer {x['layer']} expert {x['expert']})")
        begin, end = spans[x["tensor"]]
        if meta[x["tensor"]][0] != "U8":
            raise ChecksumError(f"tensor {x['tensor']!r} in {payload_file} has dtype {meta[x['tensor']][0]}, "
                                "expected U8 (the compressed bytes)")
        if end - begin != x["bytes"]:
            raise ChecksumError(f"tensor {x['tensor']!r} in {payload_file} holds {end - begin} bytes where the "
                                f"manifest says {x['bytes']}: the table's files do not belong together")
    table = ExpertTable(manifest, None, path, spans, mode)
    try:
        changed = TableChangedError(f"{payload_file} changed on disk while it was loaded: load it again")
        if mode == "copy":
            with open(payload_file, "rb") as f:
                if _file_id(os.fstat(f.fileno())) != parsed:  # not the file whose header gave the spans
                    raise changed
                data = np.frombuffer(f.read(), dtype=np.uint8)
            if data.size < max(end for _, end in spans.values()):
                raise TableChangedError(f"{payload_file} became shorter while it was read: load it again")
            table._payloads = {x["tensor"]: data[spans[x["tensor"]][0]:spans[x["tensor"]][1]] for x in manifest["experts"]}
        else:
            table._open_file()
            if table.file_identity != parsed:
                raise changed
        if verify:
            table.verify()
        if expect is not None:
            table.check_matches(expect)
    except BaseException:
        table.close()
        raise
    return table


def _file_id(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _write_manifest(path: Path, manifest: dict, history: np.ndarray | None) -> None:
    tmp = path / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path / MANIFEST_FILE)
    if history is None:
        (path / HISTORY_FILE).unlink(missing_ok=True)  # a table saved there before had it
    else:
        _save_matrices(path, history)


def history_matrices(history, num_layers: int, experts_per_layer: int) -> np.ndarray:
    """[N, L, E] uint32 activation matrices from an ActivationHistory or an array of counts (non-negative
    whole numbers, any shape of N x L x E values), each distinct matrix once, in order; InvalidArgumentError
    for anything else."""
    if isinstance(history, _native.ActivationHistory):
        history = history.flat()
    L, E = num_layers, experts_per_layer
    try:
        arr = np.asarray(history)
    except (ValueError, TypeError) as e:  # ragged lists
        raise InvalidArgumentError(f"history must be [N, {L}, {E}] activation counts: {e}") from None
    whole = arr.dtype.kind in "iub" or (arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr) & (arr == np.round(arr)))))
    if not whole or arr.size % (L * E):
        raise InvalidArgumentError(f"history must be an ActivationHistory or [N, {L}, {E}] activation counts "
                                   f"(whole numbers), got {arr.dtype} of shape {list(arr.shape)}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise InvalidArgumentError("history counts must lie in [0, 2^32)")
    arr = arr.astype(np.uint32).reshape(-1, L, E)
    if not arr.size:
        return arr
    _, first = np.unique(arr.reshape(arr.shape[0], -1), axis=0, return_index=True)
    return arr[np.sort(first)]


def _save_matrices(path, matrices: np.ndarray) -> None:
    tmp = Path(path) / (HISTORY_FILE + ".tmp.npy")
    np.save(tmp, matrices)
    tmp.replace(Path(path) / HISTORY_FILE)


def save_history(path, history, num_layers: int, experts_per_layer: int) -> None:
    """Write an ActivationHistory or [N, L, E] counts as the table directory's activation history."""
    _save_matrices(path, history_matrices(history, num_layers, experts_per_layer))


def load_history(path, capacity: int | None = None):
    """The table's saved activation matrices as an ActivationHistory (None when it has none); TableError
    when the file is not one."""
    if capacity is not None and (not _is_int(capacity) or not 0 < capacity < 2**31):
        raise InvalidArgumentError(f"capacity must be a positive integer or None, got {capacity!r}")
    f = Path(path) / HISTORY_FILE
    if not f.exists():
        return None
    try:
        arr = np.load(f, allow_pickle=False)
        if not isinstance(arr, np.ndarray) or arr.ndim != 3 or 0 in arr.shape[1:]:
            raise ValueError(f"expected [N, layers, experts] counts, found {getattr(arr, 'shape', type(arr).__name__)}")
        arr = history_matrices(arr, arr.shape[1], arr.shape[2])
    except (OSError, ValueError, EOFError) as e:  # InvalidArgumentError is a ValueError
        raise TableError(f"{f} is not an activation history ({e}): delete it, or save the table again with "
                         "its history") from None
    n, L, E = arr.shape
    hist = _native.ActivationHistory(L, E, capacity or max(n, 1))
    for m in arr:
        hist.add(np.ascontiguousarray(m))
    return hist
