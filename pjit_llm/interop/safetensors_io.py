"""Read and write safetensors files tensor by tensor, with numpy alone.

The format is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range (plus optional `__metadata__`), then the raw little-endian bytes.
Reading memory-maps the file, so a tensor costs memory only when (and as far as) it is
touched; writing puts the whole header first (every shape is known in advance) and then
appends one tensor at a time, so neither direction ever holds a whole model. Models saved in
several shards come with `model.safetensors.index.json`, whose `weight_map` names the shard
of each tensor. No torch, no `safetensors` package.
"""

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from pjit_llm.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ALIGN = 8  # tensor data starts on 8-byte boundaries (the header is padded with spaces)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file: its header, and each tensor as a read-only memory map."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a safetensors file (malformed header: {e}); "
                            "re-download or re-save it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = np.dtype(DTYPES[e["dtype"]])
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}: tensor {name} has an unreadable or unsupported header "
                                f"entry {e!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or self._data_start + end > size:
                raise UserError(f"{path}: tensor {name}'s byte range {begin}-{end} does not match "
                                f"its shape {list(shape)} or lies beyond the file; the file is damaged")
            self.entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, _ = self.entries[name]
        if 0 in shape:  # no bytes to map
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin,
                         shape=shape or (1,)).reshape(shape)


class SafetensorsDir:
    """The tensors of a model directory: one `model.safetensors`, or shards with an index."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} has no readable weight_map; re-download the model") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise UserError(f"{directory} holds no *.safetensors files; convert or download "
                                "the weights in safetensors format")
        self.files = {f: SafetensorsFile(directory / f) for f in files}
        self._where = {name: f for f, st in self.files.items() for name in st.entries}

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self._where[name]].entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.files[self._where[name]].entries[name][0]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise UserError(f"tensor {name} is missing from the safetensors files in "
                            f"{next(iter(self.files.values())).path.parent}; the checkpoint is "
                            "incomplete or not of the expected architecture")
        return self.files[self._where[name]][name]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "iB"))
    if not m:
        raise UserError(f"--shard-size {text!r} is not a size such as 2GB or 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def plan_shards(specs: list[tuple[str, np.dtype, tuple[int, ...]]], shard_bytes: int):
    """Split (name, dtype, shape) in order into shards of at most `shard_bytes` (a bigger
    tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        n = np.dtype(spec[1]).itemsize * int(np.prod(spec[2]))
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    return shards + ([current] if current else [])


def write_file(path: Path, specs, tensors: Iterable[np.ndarray], metadata: dict | None = None):
    """Write the tensors of `specs` (name, dtype, shape), given one at a time in that order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in specs:
        n = np.dtype(dtype).itemsize * int(np.prod(shape))
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
            tensor = np.asarray(tensor, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if tensor.dtype != np.dtype(dtype) or tensor.shape != tuple(shape):
                raise ValueError(f"{name}: got {tensor.dtype}{tensor.shape}, planned "
                                 f"{np.dtype(dtype)}{tuple(shape)}")
            f.write(tensor.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def write_dir(directory: Path, specs, tensor_fn, shard_bytes: int,
              metadata: dict | None = None) -> list[str]:
    """Write `specs` into shards of at most `shard_bytes`, pulling each tensor from
    `tensor_fn(name)` just before it is written; an index is added when there are several
    shards. Returns the file names."""
    shards = plan_shards(specs, shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_file(directory / name, shard, (tensor_fn(s[0]) for s in shard), metadata)
    if len(shards) > 1:
        total = sum(np.dtype(d).itemsize * int(np.prod(s)) for _, d, s in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {s[0]: name for name, shard in zip(names, shards) for s in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
