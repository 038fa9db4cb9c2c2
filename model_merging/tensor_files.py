"""Safetensors read and written one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once and `safe_open` memory-maps whole files
(their pages then count as resident). Merging four real-size experts must hold only a few tensors, so
this module reads tensors with plain file reads and writes a file whose header is planned up front.
The on-disk format is standard safetensors: an 8-byte little-endian header length, a JSON header
(name → dtype, shape, data_offsets; optional "__metadata__"), then the raw little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from model_merging.errors import MergeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """Lazy, validating reader: the header is checked against the file size, so truncation is caught early."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise MergeError(f"{self.path}: file is {size} bytes, too short to be safetensors (truncated?)")
                (n,) = struct.unpack("<Q", raw_len)
                if n > MAX_HEADER or 8 + n > size:
                    raise MergeError(f"{self.path}: header length {n} does not fit the file ({size} bytes): truncated")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeError(f"{self.path}: cannot read the safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise MergeError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise MergeError(f"{self.path}: header entry {name!r} is malformed ({e})") from e
            spec = TensorSpec(name, dtype, shape)
            if end - begin != spec.nbytes or begin < 0:
                raise MergeError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape needs {spec.nbytes}")
            self.specs[name] = spec
            self._offsets[name] = (begin, end)
            end_max = max(end_max, end)
        if self._data_start + end_max > size:
            raise MergeError(
                f"{self.path}: data ends at byte {self._data_start + end_max} but the file has {size}: truncated"
            )

    def keys(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise MergeError(f"{self.path}: no tensor named {name!r}")
        spec, (begin, end) = self.specs[name], self._offsets[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(buf.numpy()) if end > begin else 0
        if got != end - begin:
            raise MergeError(f"{self.path}: tensor {name!r} is cut short: truncated file")
        return buf.view(spec.dtype).reshape(spec.shape)


class SafetensorsStreamWriter:
    """Writes tensors in a declared order; the header (all names, dtypes, shapes) is written first.

    The sha256 of the whole file is computed on the way, so nothing is read back afterwards.
    """

    def __init__(self, path: Path | str, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in a safetensors plan")
        self.path, self.specs, self._next = Path(path), specs, 0
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._hash = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._emit(struct.pack("<Q", len(blob)) + blob)

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"tensor {name!r} written after the planned ones")
        spec = self.specs[self._next]
        t = tensor.detach().to("cpu")
        if name != spec.name or t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ValueError(
                f"expected tensor {spec.name!r} {DTYPE_NAMES[spec.dtype]} {list(spec.shape)}, got {name!r} "
                f"{DTYPE_NAMES.get(t.dtype, t.dtype)} {list(t.shape)}"
            )
        if spec.nbytes:
            self._emit(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> str:
        """Finish the file and return its sha256; fails if a planned tensor was never written."""
        self._file.close()
        if self._next != len(self.specs):
            raise ValueError(f"only {self._next} of {len(self.specs)} planned tensors were written")
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
