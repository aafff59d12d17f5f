"""Reading safetensors files tensor by tensor, validated: header parse, byte-range reads, FP8 block dequant,
non-finite detection. Used by :mod:`moeq.io.source`.

The safetensors layout (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``, then the data; offsets are relative to the byte after the header. Parsing the header ourselves
(instead of ``safe_open``) lets every inconsistency be reported with the file named before any data is read,
and reading with ``seek`` + ``readinto`` touches only the bytes of the tensors asked for (no mmap of the
whole shard), so memory follows what is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeq.io.integrity import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEADER = 100 * 2**20  # the safetensors library refuses headers above 100 MB too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` from byte ``start`` (absolute), ``nbytes`` long."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _entry(path: Path, name: str, raw, data_len: int, data_start: int) -> TensorInfo:
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {name!r} lacks dtype/shape/data_offsets)")
    dtype = ST_DTYPES.get(raw["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {raw['dtype']!r}")
    shape, offs = raw["shape"], raw["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
        raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name!r}: shape {shape}, offsets {offs})")
    begin, end = offs
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} data_offsets {offs} do not hold {raw['dtype']} {shape} "
                              f"({nbytes} bytes)")
    if end > data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file (truncated: tensor {name!r} ends at data byte {end} "
                              f"but the file holds only {data_len} data bytes)")
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, nbytes)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one safetensors file's header (no tensor data read).

    Returns:
        ``(tensors, metadata)``: name -> :class:`TensorInfo`, and the ``__metadata__`` dict (or ``{}``).
    Raises:
        CheckpointError naming ``path``: file shorter than its header, header length beyond the file, invalid
        JSON, an entry with unknown dtype / inconsistent offsets, data beyond the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (truncated: {size} bytes, shorter than the 8-byte "
                                  "header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} is beyond the file size "
                                  f"{size}: truncated or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = {name: _entry(path, name, e, size - data_start, data_start) for name, e in header.items()}
    return tensors, meta if isinstance(meta, dict) else {}


class ShardReader:
    """Reads tensors by :class:`TensorInfo`, keeping each file open once; ``bytes_read`` counts what was read
    (the memory test asserts it equals the tensors asked for). Use as a context manager."""

    def __init__(self):
        self._files: dict[Path, object] = {}
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(self, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in its stored dtype and shape: freshly allocated on the CPU, or read straight into ``out``
        (a contiguous CPU tensor of that dtype and shape, e.g. one expert's slice of a fused stack)."""
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous() or out.is_cuda:
            raise ValueError(f"read target {out.dtype} {tuple(out.shape)} cannot hold {info.dtype} {info.shape}")
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        f.seek(info.start)
        raw = out.reshape(-1).view(torch.uint8)
        got = f.readinto(memoryview(raw.numpy())) if info.nbytes else 0
        if got != info.nbytes:  # the file shrank after its header was parsed
            raise CheckpointError(f"{info.file}: short read at byte {info.start} ({got} of {info.nbytes} bytes)")
        self.bytes_read += got
        return out


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3-style block FP8 to float32: ``W[r, c] = float(q[r, c]) * scale_inv[r // b0, c // b1]``.

    Args:
        weight: float8 ``[..., R, C]`` (e4m3fn or e5m2).
        scale_inv: float32 / bf16 / float8_e8m0fnu ``[..., ceil(R/b0), ceil(C/b1)]``; edge blocks are partial
            (the weight was padded to whole blocks before its scale was taken, then cut back).
        block: ``(b0, b1)``, the ``weight_block_size`` of the checkpoint's ``quantization_config``.
    Returns:
        float32 ``[..., R, C]``.
    """
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    want = (*weight.shape[:-2], -(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} with "
                         f"{b0}x{b1} blocks (expected {want})")
    out = weight.to(torch.float32)
    # expand the scales over rows only and loop over column blocks, so no second weight-sized tensor exists
    s = scale_inv.to(torch.float32).repeat_interleave(b0, dim=-2)[..., :rows, :]
    for j in range(want[-1]):
        out[..., j * b1 : (j + 1) * b1].mul_(s[..., j : j + 1])
    return out


def first_nonfinite(t: torch.Tensor) -> tuple[tuple[int, ...], float, int] | None:
    """``(index, value, count)`` of the first NaN/Inf of a float tensor in row-major order, or None."""
    if t.numel() == 0:
        return None
    # fast path without a tensor-sized temporary: min/max propagate NaN and expose +-Inf
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    bad = ~torch.isfinite(t)
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
    return idx, float(t.reshape(-1)[flat]), int(bad.sum())


def check_finite(t: torch.Tensor, key: str, where: str) -> None:
    """CheckpointError naming the source tensor ``key`` (in ``where``) and the first non-finite position."""
    hit = first_nonfinite(t)
    if hit is not None:
        idx, val, count = hit
        raise CheckpointError(f"{where}: source tensor {key} has {count} non-finite value(s), the first {val} at "
                              f"index {idx}; moeq refuses to quantize non-finite weights")
