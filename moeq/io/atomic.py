"""Transactional checkpoint writes: deterministic safetensors files, a temporary sibling directory, one swap.

A checkpoint directory is written whole into ``.<name>.moeq-tmp-<hex>`` next to the destination, every file
flushed to disk, then swapped into place: with ``renameat2(RENAME_EXCHANGE)`` (Linux) the old and the new
directory trade places in one atomic step, so an interrupt at any moment leaves either the complete old or
the complete new checkpoint under the destination name. Where the exchange is not available the old
directory is first renamed to ``.<name>.moeq-old-<hex>``; an interrupt between the two renames leaves the
destination absent and the old checkpoint complete under that name (``load_quantized`` says where).

The safetensors writer is this module's own (the format: an 8-byte little-endian header length, a JSON
header, the raw tensor bytes) so the bytes are reproducible: header keys sorted, tensors laid out by
decreasing element size then name (every tensor stays aligned to its element size), and the SHA-256 of the
data section computed while writing (``moeq verify`` checks it).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from moeq.io.source_tensors import ST_DTYPES as ST_BY_NAME

logger = logging.getLogger(__name__)

ST_DTYPES = {dt: name for name, dt in ST_BY_NAME.items()}  # torch dtype -> safetensors dtype name
TMP_TAG, OLD_TAG = ".moeq-tmp-", ".moeq-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_READ_BACK = 16 * 2**20  # bytes per read when a written file's digest is computed from the disk


class DestinationError(ValueError):
    """The output directory cannot be written: it holds other data, is the source, or needs ``overwrite``."""


def _header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a file holding tensors of ``layout`` (name -> dtype, shape) and each tensor's
    data offset: tensors by decreasing element size then name, sorted keys, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offsets, offset = {}, 0
    for key in sorted(layout, key=lambda k: (-layout[k][0].itemsize, k)):
        dtype, shape = layout[key]
        if dtype not in ST_DTYPES:
            raise TypeError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[key] = offset
        offset += nbytes
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8), offsets


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      digest_key: str | None = None) -> str:
    """Write ``tensors`` (any device/layout) to ``path`` deterministically, fsync it, return the data SHA-256.

    The header is ``{"__metadata__": metadata, name: {"dtype", "shape", "data_offsets"}}`` with sorted keys and
    no whitespace, padded with spaces to a multiple of 8 bytes. With ``digest_key`` the data SHA-256 is also
    stored in the metadata under that key (computed before the header is written).
    """
    raws = {k: _raw_bytes(t) for k, t in tensors.items()}
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    digest = hashlib.sha256()
    for key in order:
        digest.update(raws[key])
    meta = dict(metadata, **({digest_key: digest.hexdigest()} if digest_key else {}))
    blob, _ = _header(layout, meta)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in order:
            f.write(raws[key])
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def write_safetensors_parts(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                            parts: Iterable[dict[str, torch.Tensor]], metadata: dict[str, str],
                            digest_key: str | None = None) -> str:
    """The file :func:`write_safetensors` writes for the same tensors, holding one part of them at a time.

    ``layout`` (name -> dtype, shape) fixes the header up front; each dict of ``parts`` is written at its
    tensors' offsets and released before the next one is produced (the streaming pipeline's embeddings and
    lm_head: 0.6 GiB each for Qwen3's vocabulary). The data SHA-256 is then read back from the file and
    patched into the header under ``digest_key``. Raises ``ValueError`` when a part's tensor is not in
    ``layout``, differs from it in dtype or shape, or comes twice, or when a tensor never came.
    """
    meta = dict(metadata, **({digest_key: "0" * 64} if digest_key else {}))
    blob, offsets = _header(layout, meta)
    done: set[str] = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        start = f.tell()
        for part in parts:
            _write_part(f, path, part, layout, offsets, start, done)
            del part  # before the next part is produced
        if done != set(layout):
            raise ValueError(f"{path.name}: no data for {sorted(set(layout) - done)}")
        f.flush()
        os.fsync(f.fileno())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_READ_BACK):
            digest.update(chunk)
    if digest_key:
        patch_metadata(path, {digest_key: digest.hexdigest()})
    return digest.hexdigest()


def _write_part(f, path: Path, part: dict[str, torch.Tensor], layout: dict, offsets: dict[str, int], start: int,
                done: set[str]) -> None:
    """Write the tensors of ``part`` at their offsets (a function, so no reference outlives the call)."""
    for key, t in part.items():
        if key in done or key not in layout or (t.dtype, tuple(t.shape)) != tuple(layout[key]):
            want = "written already" if key in done else layout.get(key, "no such tensor")
            raise ValueError(f"{path.name}: {key} {t.dtype} {tuple(t.shape)} does not fit the layout ({want})")
        f.seek(start + offsets[key])
        f.write(_raw_bytes(t))
        done.add(key)


def patch_metadata(path: Path, updates: dict[str, str]) -> None:
    """Replace metadata values in the header of a file :func:`write_safetensors` wrote, in place.

    Each new value must have the length of the placeholder it replaces (digests: 64 hex characters), so the
    header keeps its size and the data section is not moved: the file ends up byte-identical to writing it
    with the final metadata in one go. This is how the streaming pipeline writes each layer once, before the
    digests of the whole checkpoint are known.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header["__metadata__"]
        for key, value in updates.items():
            if key not in meta or len(meta[key]) != len(value):
                raise ValueError(f"{path}: metadata {key!r} has no placeholder of length {len(value)}")
            meta[key] = value
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        if len(blob) != n:
            raise ValueError(f"{path}: patched header is {len(blob)} bytes, was {n}")
        f.seek(8)
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order (no copy when already contiguous on the CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_json(path: Path, obj) -> None:
    """``obj`` as sorted, indented JSON, flushed to disk."""
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_replaceable(path: Path) -> bool:
    """True for a directory moeq wrote: a moeq checkpoint or a ``moeq export`` (its config names moeq)."""
    try:
        q = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and (q.get("quant_method") == "moeq" or isinstance(q.get("moeq"), dict))


def check_destination(dest: str | os.PathLike, sources: list[str | os.PathLike], overwrite: bool) -> Path:
    """Raise :class:`DestinationError` unless writing a checkpoint to ``dest`` is safe; returns it resolved.

    Refused: ``dest`` equal to, inside, or containing a source; an existing file; a non-empty directory that
    moeq did not write; an existing moeq checkpoint unless ``overwrite``.
    """
    out = Path(dest).expanduser().resolve()
    for s in sources:
        src = Path(s).expanduser().resolve()
        if out == src or src in out.parents:
            raise DestinationError(f"output {dest} is {'the source' if out == src else 'inside the source'} {s}; "
                                   "choose a directory outside it")
        if out in src.parents:
            raise DestinationError(f"output {dest} contains the source {s}; replacing it would delete the source")
    if out.exists() and not out.is_dir():
        raise DestinationError(f"output {dest} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_replaceable(out):
            raise DestinationError(f"output {dest} is not empty and is not a checkpoint written by moeq; refusing to "
                                   "write into it (choose a new or empty directory)")
        if not overwrite:
            raise DestinationError(f"output {dest} already holds a checkpoint written by moeq; pass --overwrite "
                                   "(overwrite=True) to replace it")
    return out


class CheckpointTransaction:
    """``with CheckpointTransaction(dest, ...) as tx:`` write files into ``tx.dir``; on a clean exit the
    directory replaces ``dest`` atomically, on any exception (Ctrl-C included) it is deleted and ``dest`` is
    untouched.

    ``on_step(name)`` is called before each step (``tmp``, every name passed to :meth:`step`, ``swap``,
    ``cleanup``): tests raise from it to interrupt the save at that point.
    """

    def __init__(self, dest: Path, on_step: Callable[[str], None] | None = None, workdir: Path | None = None):
        self.dest = Path(dest)
        self.on_step = on_step
        self.workdir = None if workdir is None else Path(workdir)
        self.dir: Path | None = None

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def __enter__(self) -> "CheckpointTransaction":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.step("tmp")
        if self.workdir is not None:  # a resumable run's own directory: it already holds finished work
            self.dir = self.workdir
            return self
        self.dir = self.dest.parent / f".{self.dest.name}{TMP_TAG}{secrets.token_hex(4)}"
        self.dir.mkdir()
        return self

    def _discard(self) -> None:
        if self.workdir is None:  # a workdir is kept: re-running the command resumes from it
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._discard()
            return False
        try:
            _fsync_dir(self.dir)
            self.step("swap")
            old = _swap_into_place(self.dir, self.dest, self.step)
        except BaseException:
            self._discard()
            raise
        _fsync_dir(self.dest.parent)
        if old is not None:
            try:
                self.step("cleanup")
            finally:
                shutil.rmtree(old, ignore_errors=True)
        return False


def _swap_into_place(new: Path, dest: Path, step: Callable[[str], None]) -> Path | None:
    """Put ``new`` at ``dest``; returns where the previous ``dest`` now is (to delete), or None."""
    if not dest.exists():
        os.rename(new, dest)
        return None
    if _rename_exchange(new, dest):
        return new  # the old checkpoint now sits under the temporary name
    old = dest.parent / f".{dest.name}{OLD_TAG}{secrets.token_hex(4)}"
    os.rename(dest, old)
    try:
        step("swap_rename")  # the one moment the destination is absent (the old checkpoint complete at ``old``)
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)  # an exception here (Ctrl-C) puts the old one back; only a hard kill leaves ``old``
        raise
    return old


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def interrupted_replace_note(dest: Path) -> str | None:
    """Where an interrupted two-rename replace left the previous checkpoint of ``dest``, if it did."""
    left = sorted(dest.parent.glob(f".{dest.name}{OLD_TAG}*")) if dest.parent.is_dir() else []
    return f"an interrupted replace left the previous checkpoint at {left[-1]}" if left else None
