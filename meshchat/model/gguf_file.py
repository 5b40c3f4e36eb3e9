"""Read a GGUF file's header (metadata and tensor table) fast, with errors a user can act on.

gguf's own reader builds a numpy object per tokenizer string and takes seconds on a 49k-token
vocabulary; this reader walks the header once with `struct`, keeps each metadata entry's raw
bytes (so slices can copy them verbatim) and decodes values only when asked.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from meshchat.errors import MeshchatError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
# Bounds that stop a corrupt header from asking for absurd allocations.
_MAX_STRING = 1 << 26
_MAX_ITEMS = 1 << 28


class ModelFileError(MeshchatError):
    """A model file that is missing, not GGUF, truncated or otherwise unusable."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: where its bytes are and what they hold."""

    name: str
    type_id: int
    shape: tuple[int, ...]  # ggml order: ne[0] first
    offset: int  # absolute offset of the data in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type{self.type_id}"

    @property
    def layer(self) -> int | None:
        """The block index for `blk.N.*` tensors, None for global tensors."""
        match = _BLOCK_TENSOR.match(self.name)
        return int(match.group(1)) if match else None

    def renamed(self, name: str) -> TensorEntry:
        return TensorEntry(name, self.type_id, self.shape, self.offset, self.n_bytes)


@dataclass
class MetadataEntry:
    """One key/value pair: its raw encoded value (type tag included) and a decoder."""

    key: str
    value_type: ValueType
    raw: bytes  # the encoded type tag + value, exactly as in the file
    _decoded: Any = field(default=None, repr=False)
    _has_decoded: bool = field(default=False, repr=False)

    @property
    def item_type(self) -> ValueType | None:
        """The element type of an array (read from its header, without decoding it)."""
        if self.value_type != ValueType.ARRAY:
            return None
        return ValueType(struct.unpack_from("<I", self.raw, 4)[0])

    @property
    def array_length(self) -> int | None:
        """The element count of an array (read from its header, without decoding it)."""
        if self.value_type != ValueType.ARRAY:
            return None
        return int(struct.unpack_from("<Q", self.raw, 8)[0])

    @property
    def value(self) -> Any:
        if not self._has_decoded:
            self._decoded = _decode_value(self.raw)
            self._has_decoded = True
        return self._decoded


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, MetadataEntry]
    tensors: list[TensorEntry]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        entry = self.metadata.get(key)
        return default if entry is None else entry.value

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"GGUF metadata lacks general.architecture: {self.path}")
        return arch


class _Cursor:
    """Sequential reads from a file with bounds checks that raise ModelFileError."""

    def __init__(self, handle: BinaryIO, path: Path, size: int) -> None:
        self.handle = handle
        self.path = path
        self.size = size

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise ModelFileError(f"truncated GGUF file: {self.path} (header is cut off)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        length = self.unpack("<Q")
        if length > _MAX_STRING:
            raise ModelFileError(f"corrupt GGUF file: {self.path} (string of {length} bytes)")
        return self.read(length)

    def value_bytes(self, value_type: int) -> bytes:
        """The encoded bytes of one value of `value_type` (no type tag)."""
        if value_type in _SCALAR_FORMATS:
            return self.read(struct.calcsize(_SCALAR_FORMATS[ValueType(value_type)]))
        if value_type == ValueType.STRING:
            length_bytes = self.read(8)
            (length,) = struct.unpack("<Q", length_bytes)
            if length > _MAX_STRING:
                raise ModelFileError(f"corrupt GGUF file: {self.path} (string of {length} bytes)")
            return length_bytes + self.read(length)
        if value_type == ValueType.ARRAY:
            head = self.read(12)
            item_type, count = struct.unpack("<IQ", head)
            if count > _MAX_ITEMS:
                raise ModelFileError(f"corrupt GGUF file: {self.path} (array of {count} items)")
            if item_type in _SCALAR_FORMATS:
                return head + self.read(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
            return head + b"".join(self.value_bytes(item_type) for _ in range(count))
        raise ModelFileError(f"corrupt GGUF file: {self.path} (unknown value type {value_type})")


def _decode_value(raw: bytes) -> Any:
    (value_type,) = struct.unpack_from("<I", raw, 0)
    value, _ = _decode_at(raw, 4, value_type)
    return value


def _decode_at(raw: bytes, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[ValueType(value_type)]
        return struct.unpack_from(fmt, raw, pos)[0], pos + struct.calcsize(fmt)
    if value_type == ValueType.STRING:
        (length,) = struct.unpack_from("<Q", raw, pos)
        start = pos + 8
        return raw[start : start + length].decode("utf-8", errors="replace"), start + length
    if value_type == ValueType.ARRAY:
        item_type, count = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        items = []
        for _ in range(count):
            item, pos = _decode_at(raw, pos, item_type)
            items.append(item)
        return items, pos
    raise ValueError(f"unknown GGUF value type {value_type}")


def encode_value(value_type: ValueType, value: Any, item_type: ValueType | None = None) -> bytes:
    """Encode a value with its type tag, as a metadata entry's `raw` bytes."""
    return struct.pack("<I", value_type) + _encode_bare(value_type, value, item_type)


def _encode_bare(value_type: ValueType, value: Any, item_type: ValueType | None) -> bytes:
    if value_type in _SCALAR_FORMATS:
        return struct.pack(_SCALAR_FORMATS[value_type], value)
    if value_type == ValueType.STRING:
        data = value.encode()
        return struct.pack("<Q", len(data)) + data
    if value_type == ValueType.ARRAY:
        assert item_type is not None
        items = b"".join(_encode_bare(item_type, item, None) for item in value)
        return struct.pack("<IQ", item_type, len(value)) + items
    raise ValueError(f"cannot encode GGUF value type {value_type}")


def tensor_n_bytes(type_id: int, shape: tuple[int, ...]) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ModelFileError(f"unknown tensor type {type_id}") from None
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return n_elements // block_size * type_size


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF at `path`; check every tensor lies inside the file."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            return _parse(_Cursor(handle, path, size))
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from exc


def _parse(cur: _Cursor) -> GGUFHeader:
    path = cur.path
    if cur.size < 4 or cur.read(4) != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file: {path}")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelFileError(f"unsupported GGUF version {version}: {path}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > _MAX_ITEMS or n_kv > _MAX_ITEMS:
        raise ModelFileError(f"corrupt GGUF file: {path} (absurd counts)")
    metadata: dict[str, MetadataEntry] = {}
    for _ in range(n_kv):
        key = cur.string().decode("utf-8", errors="replace")
        type_tag = cur.read(4)
        (value_type,) = struct.unpack("<I", type_tag)
        body = cur.value_bytes(value_type)
        metadata[key] = MetadataEntry(key, ValueType(value_type), type_tag + body)
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", errors="replace")
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ModelFileError(f"corrupt GGUF file: {path} (tensor {name} has {n_dims} dims)")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, type_id, shape, offset))
    align_entry = metadata.get("general.alignment")
    alignment = int(align_entry.value) if align_entry is not None else DEFAULT_ALIGNMENT
    header_end = cur.handle.tell()
    data_offset = (header_end + alignment - 1) // alignment * alignment
    tensors = []
    for name, type_id, shape, offset in infos:
        entry = TensorEntry(
            name, type_id, shape, data_offset + offset, tensor_n_bytes(type_id, shape)
        )
        if entry.offset + entry.n_bytes > cur.size:
            raise ModelFileError(f"truncated GGUF file: {path} (tensor {name} is cut off)")
        tensors.append(entry)
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset, cur.size)


@dataclass(frozen=True)
class TensorLayout:
    """A tensor to write: name, ggml type id, shape (ggml order), byte count."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    n_bytes: int


def _encode_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def encode_header(
    metadata: list[tuple[str, bytes]], tensors: list[TensorLayout], alignment: int
) -> bytes:
    """The bytes of a GGUF v3 header, padded so tensor data can follow at once.

    `metadata` holds (key, raw) pairs, raw being a type tag plus value (MetadataEntry.raw or
    `encode_value`). Tensor data must follow in order, each padded to `alignment`.
    """
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, raw in metadata:
        head += _encode_string(key) + raw
    offset = 0
    for tensor in tensors:
        head += _encode_string(tensor.name) + struct.pack("<I", len(tensor.shape))
        head += b"".join(struct.pack("<Q", d) for d in tensor.shape)
        head += struct.pack("<IQ", tensor.type_id, offset)
        offset = _align(offset + tensor.n_bytes, alignment)
    head += bytes(_align(len(head), alignment) - len(head))
    return bytes(head)


def padding(n_bytes: int, alignment: int) -> bytes:
    return bytes(_align(n_bytes, alignment) - n_bytes)
