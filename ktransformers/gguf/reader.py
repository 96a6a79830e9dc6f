"""Memory-mapped GGUF reader: single files and split sets, metadata as plain Python values.

The header is parsed here rather than with `gguf.GGUFReader` because that reader builds one numpy
view per array element and needs ~6 s for the 129k-entry tokenizer arrays of a DeepSeek file;
tensor data is never read, only sliced out of the map.
"""

from __future__ import annotations

import mmap
import re
import struct
import sys
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType, Keys

from .errors import GGUFError
from .ggml_types import GGMLType, row_nbytes
from .quant_tensor import QuantTensor

SUPPORTED_VERSIONS = (2, 3)
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT,
                                        Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
MAX_ARRAY_DEPTH = 8   # real files nest at most 2 (arrays of arrays); deeper is a damaged or crafted file
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Little-endian layout of each scalar metadata type (GGUF files written on x86/ARM hosts).
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


class _Cursor:
    """Reads GGUF header values in order; running past the end is reported as a cut header."""

    def __init__(self, buffer: mmap.mmap, path: Path):
        self.buffer, self.path, self.offset = buffer, path, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise GGUFError(self.path, f"truncated file: header cut short at byte {self.offset} "
                                       f"(file has {len(self.buffer)} bytes)")
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += size
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFError(self.path, f"truncated file: {what} of {length} bytes at byte {self.offset} "
                                       f"runs past the end ({len(self.buffer)} bytes)")
        raw = self.buffer[self.offset:end]
        self.offset = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise GGUFError(self.path, f"{what} is not valid UTF-8 ({error})") from None

    def value_type(self, key: str) -> GGUFValueType:
        type_id = self.unpack("<I")
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise GGUFError(self.path, f"metadata {key!r} has unknown value type {type_id}") from None

    def value(self, key: str, value_type: GGUFValueType, depth: int = 0) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string(f"metadata {key!r}")
        if value_type == GGUFValueType.ARRAY:
            return self.array(key, depth + 1)
        return self.unpack(SCALAR_FORMATS[value_type])

    def array(self, key: str, depth: int = 1) -> list:
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(self.path, f"metadata {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep "
                                       "(a damaged or crafted file)")
        item_type = self.value_type(key)
        count = self.unpack("<Q")
        if item_type in SCALAR_FORMATS:
            # Numbers in one block: a single frombuffer + tolist instead of a per-element loop.
            dtype = np.dtype(SCALAR_FORMATS[item_type])
            end = self.offset + count * dtype.itemsize
            if end > len(self.buffer):
                raise GGUFError(self.path, f"truncated file: metadata array {key!r} of {count} items "
                                           f"runs past the end ({len(self.buffer)} bytes)")
            values = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset = end
            return values
        if item_type == GGUFValueType.STRING:
            return self.string_array(key, count)
        return [self.value(key, item_type, depth) for _ in range(count)]

    def string_array(self, key: str, count: int) -> list[str]:
        # The hot path for tokenizer vocabularies and merges (>100k entries): locals only, one decode each.
        buffer, offset, size = self.buffer, self.offset, len(self.buffer)
        unpack_length = struct.Struct("<Q").unpack_from
        strings = []
        for _ in range(count):
            if offset + 8 > size:
                break
            start = offset + 8
            offset = start + unpack_length(buffer, offset)[0]
            if offset > size:
                break
            strings.append(buffer[start:offset])
        else:
            self.offset = offset
            try:
                return [raw.decode("utf-8") for raw in strings]
            except UnicodeDecodeError as error:
                raise GGUFError(self.path, f"metadata array {key!r} holds a non-UTF-8 string ({error})") from None
        raise GGUFError(self.path, f"truncated file: metadata array {key!r} of {count} strings "
                                   f"runs past the end ({size} bytes)")


@dataclass
class _TensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # torch order
    offset: int  # relative to the start of the data section


def _read_tensor_info(cursor: _Cursor) -> _TensorInfo:
    name = cursor.string("tensor name")
    n_dims = cursor.unpack("<I")
    ne = [cursor.unpack("<Q") for _ in range(n_dims)]
    type_id = cursor.unpack("<I")
    offset = cursor.unpack("<Q")
    try:
        ggml_type = GGMLType(type_id)
    except ValueError:
        raise GGUFError(cursor.path, f"tensor {name!r} has unknown ggml type id {type_id}") from None
    return _TensorInfo(name, ggml_type, tuple(reversed(ne)), offset)


@dataclass
class GGUFFile:
    """One .gguf file: its map, metadata and tensors (views into the map)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, QuantTensor]
    buffer: np.ndarray  # the whole file as uint8, sharing memory with the map
    mapping: mmap.mmap | None = field(default=None, repr=False)

    def populate(self) -> bool:
        """Map every page of the file into this process now; False where the kernel cannot (before 5.14)."""
        try:
            self.mapping.madvise(MADV_POPULATE_READ)
        except (OSError, ValueError, AttributeError):
            return False
        return True


# Private (copy-on-write) pages make the arrays writable for torch.from_numpy without ever touching
# the file. MAP_NORESERVE keeps the kernel from reserving memory for the whole file up front:
# without it a file larger than RAM + swap cannot be mapped at all.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
# Prefaults pages readable without breaking copy-on-write (Linux 5.14+; Python names it from 3.13 on).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _map_file(fileno: int) -> mmap.mmap:
    if _MAP_NORESERVE:
        return mmap.mmap(fileno, 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)


def read_gguf_file(path: Path) -> GGUFFile:
    """Parse one GGUF file's header and index its tensors; tensor bytes stay in the map."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            mapped = _map_file(handle.fileno())
    except ValueError:  # mmap refuses empty files
        raise GGUFError(path, "not a GGUF file: it is empty") from None
    except OSError as error:
        raise GGUFError(path, f"cannot open: {error.strerror}") from None

    cursor = _Cursor(mapped, path)
    if len(mapped) < 4 or struct.unpack_from("<I", mapped, 0)[0] != GGUF_MAGIC:
        raise GGUFError(path, f"not a GGUF file: magic is {bytes(mapped[:4])!r}, expected b'GGUF'")
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(path, f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS}; "
                              "big-endian files are not supported)")
    tensor_count = cursor.unpack("<Q")
    kv_count = cursor.unpack("<Q")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string("metadata key")
        if key in metadata:
            raise GGUFError(path, f"metadata key {key!r} appears twice")
        metadata[key] = cursor.value(key, cursor.value_type(key))

    infos = [_read_tensor_info(cursor) for _ in range(tensor_count)]
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(path, f"general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cursor.offset // alignment) * alignment

    buffer = np.frombuffer(mapped, dtype=np.uint8)
    tensors: dict[str, QuantTensor] = {}
    for info in infos:
        if info.name in tensors:
            raise GGUFError(path, f"tensor {info.name!r} appears twice")
        try:
            nbytes = row_nbytes(info.ggml_type, info.shape[-1]) * prod(info.shape[:-1])
        except (ValueError, IndexError) as error:
            raise GGUFError(path, f"tensor {info.name!r} of shape {info.shape}: {error}") from None
        start = data_start + info.offset
        if start + nbytes > buffer.size:
            raise GGUFError(path, f"truncated file: tensor {info.name!r} needs bytes {start}..{start + nbytes} "
                                  f"but the file has {buffer.size} bytes")
        tensors[info.name] = QuantTensor(info.name, info.ggml_type, info.shape, buffer[start:start + nbytes])
    return GGUFFile(path, version, metadata, tensors, buffer, mapped)


def find_parts(path: Path | str) -> list[Path]:
    """The files of one model: `path` is a .gguf file, any part of a split set, or a directory."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.gguf"))
        if not candidates:
            raise GGUFError(path, "directory holds no .gguf file")
        models = {_model_key(candidate) for candidate in candidates}
        if len(models) > 1:
            names = ", ".join(sorted(candidate.name for candidate in candidates))
            raise GGUFError(path, f"directory holds more than one model ({names}); pass the file to use")
        path = candidates[0]
    if not path.is_file():
        raise GGUFError(path, "no such file")
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    if count < 1:
        raise GGUFError(path, "split file name says the set has 0 parts")
    parts = [path.with_name(f"{match['prefix']}-{number:05d}-of-{count:05d}.gguf") for number in range(1, count + 1)]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise GGUFError(path, f"split set of {count} parts is missing part(s): {', '.join(missing)}")
    return parts


def _model_key(path: Path) -> str:
    """Files of one split set share a key; every other file is a model of its own."""
    match = SPLIT_NAME.match(path.name)
    return f"{match['prefix']}-of-{match['count']}" if match else path.name


@dataclass
class GGUFModel:
    """All files of one model, with metadata and a tensor index by name across the parts."""

    files: list[Path]
    metadata: dict[str, Any]
    tensors: dict[str, QuantTensor]
    parts: list[GGUFFile] = field(repr=False)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def __getitem__(self, name: str) -> QuantTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.files[0]}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, default: QuantTensor | None = None) -> QuantTensor | None:
        return self.tensors.get(name, default)

    def populate(self) -> bool:
        """Map every page of every part into this process now (the files are read into the page cache
        if they are not there yet), so no kernel pays a page fault at a weight's first use: a token
        routed to experts not used before otherwise faulted in their pages one 64 KB window at a time,
        which made the first tokens of a CPU-only decode several times slower. False where unsupported."""
        return all([part.populate() for part in self.parts])


def open_gguf(path: Path | str) -> GGUFModel:
    """Open a GGUF model (file, any split part, or directory); raises GGUFError naming file and reason."""
    paths = find_parts(path)
    parts = [read_gguf_file(part) for part in paths]
    _check_split_metadata(parts)

    metadata: dict[str, Any] = {}
    tensors: dict[str, QuantTensor] = {}
    owner: dict[str, Path] = {}
    for part in parts:
        for key, value in part.metadata.items():
            metadata.setdefault(key, value)  # the first part carries the model's metadata
        for name, tensor in part.tensors.items():
            if name in tensors:
                raise GGUFError(part.path, f"duplicate tensor {name!r}: also in {owner[name].name}")
            tensors[name] = tensor
            owner[name] = part.path
    if "general.architecture" not in metadata:
        raise GGUFError(paths[0], "metadata has no general.architecture")
    expected = metadata.get(SPLIT_TENSORS)
    if expected is not None and expected != len(tensors):
        raise GGUFError(paths[0], f"{SPLIT_TENSORS} says {expected} tensors, the parts hold {len(tensors)}")
    for key in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS):
        metadata.pop(key, None)  # describe one file, not the model
    return GGUFModel(paths, metadata, tensors, parts)


def _check_split_metadata(parts: list[GGUFFile]) -> None:
    count = len(parts)
    for number, part in enumerate(parts):
        declared = part.metadata.get(SPLIT_COUNT, 1)
        if declared != count:
            raise GGUFError(part.path, f"{SPLIT_COUNT} is {declared} but the set has {count} file(s)")
        if part.metadata.get(SPLIT_NO, 0) != number:
            raise GGUFError(part.path, f"{SPLIT_NO} is {part.metadata.get(SPLIT_NO)}, expected {number}")
