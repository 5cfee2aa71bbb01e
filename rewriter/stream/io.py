"""Safetensors read one tensor (or row range) at a time, and written shard by shard.

`LazyCheckpoint` maps tensor names to the files of an HF folder (single file or index) and reads through
`safe_open` / `get_slice`, opening a file only for the tensors asked for and closing it after, so the process never
holds (or maps) more of the checkpoint than the block it works on. `write_shard` writes one shard with a constant
memory cost: tensors in memory go out as bytes, tensors that pass through unchanged are copied from the source file's
byte range in chunks (a 2 GB embedding never enters memory whole).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RewriterError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPY_CHUNK = 64 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RewriterError(f"{path} is not a safetensors file (shorter than its header length)")
        n = struct.unpack("<Q", raw)[0]
        if n > 100 << 20:
            raise RewriterError(f"{path} declares a {n}-byte header; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RewriterError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + n


@dataclass
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int        # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class LazyCheckpoint:
    """The tensors of an HF folder, read on demand."""

    def __init__(self, folder: str | Path):
        from ..load import _weight_files
        self.folder = Path(folder)
        files = _weight_files(self.folder)
        if not files:
            raise RewriterError(f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX})",
                                "streaming reads safetensors checkpoints only")
        self.info: dict[str, TensorInfo] = {}
        for path in files:
            header, data_start = read_header(path)
            size = path.stat().st_size
            for name, h in header.items():
                if h.get("dtype") not in DTYPES:
                    raise RewriterError(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')!r}")
                a, b = h["data_offsets"]
                if data_start + b > size:
                    raise RewriterError(f"corrupt or truncated safetensors file {path}: {name} ends past the file",
                                        "re-download or re-save the checkpoint")
                self.info[name] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), data_start + a,
                                             data_start + b)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.info if n.startswith(prefix)]

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def tensor(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        t = self._read(name, None, None)
        return t.to(device=device, dtype=dtype or t.dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        t = self._read(name, start, stop)
        return t.to(device=device, dtype=dtype or t.dtype)

    def _read(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        if name not in self.info:
            raise RewriterError(f"{self.folder} has no tensor {name!r}")
        info = self.info[name]
        from safetensors import safe_open
        with safe_open(str(info.file), framework="pt") as f:
            if start is None:
                return f.get_tensor(name)
            return f.get_slice(name)[start:stop]

    def block(self, prefix: str, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (e.g. 'model.layers.3.'), names relative to it."""
        return {n[len(prefix):]: self.tensor(n, dtype, device) for n in self.names(prefix)}


def _tensor_buffer(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def write_shard(path: Path, tensors: dict[str, torch.Tensor], copies: dict[str, TensorInfo] = {},
                metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file: `tensors` from memory, `copies` byte-copied from their source files. The file is
    written under a temporary name and renamed when complete (fsync'd): a shard that exists is whole. Returns its
    data bytes."""
    entries, offset = {}, 0
    order = sorted(set(tensors) | set(copies))
    if len(order) != len(tensors) + len(copies):
        raise ValueError("a tensor name is both written and copied")
    for name in order:
        if name in tensors:
            t = tensors[name]
            n, dtype, shape = t.numel() * t.element_size(), t.dtype, tuple(t.shape)
        else:
            info = copies[name]
            n, dtype, shape = info.nbytes, info.dtype, info.shape
        if dtype not in CODES:
            raise RewriterError(f"cannot store {name} of dtype {dtype} in safetensors")
        entries[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = dict(entries)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)            # data aligned to 8 bytes, as safetensors writes it
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                if name in tensors:
                    f.write(_tensor_buffer(tensors[name]))
                    continue
                info = copies[name]
                with info.file.open("rb") as src:
                    src.seek(info.start)
                    left = info.nbytes
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise RewriterError(f"{info.file} ended while copying {name}")
                        f.write(chunk)
                        left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return offset


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
