"""``moeq verify DIR``: the full content check of a moeq checkpoint (every byte read and hashed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moeq.io.checkpoint import read_quantization_config, shard_files
from moeq.io.integrity import (META_DATA, CheckpointError, bits_for_key, check_binding, check_values, data_sha256,
                               read_header)

logger = logging.getLogger(__name__)


def verify_data(headers) -> None:
    """Recompute each shard's data SHA-256 against its ``moeq_data_sha256``."""
    for h in headers:
        want = h.metadata.get(META_DATA)
        if want is None:
            raise CheckpointError(f"{h.path}: no {META_DATA} in the metadata; cannot verify its content")
        if data_sha256(h) != want:
            raise CheckpointError(f"{h.path}: content does not match its recorded SHA-256 (corrupted on disk or in "
                                  "transfer); restore it from the original")


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Check structure, digests, data hashes and every tensor's values; returns report lines, raises
    :class:`CheckpointError` at the first problem (naming file, tensor and index)."""
    p = Path(path)
    q = read_quantization_config(p)
    files = shard_files(p)
    headers = [read_header(f) for f in files]
    if not check_binding(q, headers, str(p)):
        raise CheckpointError(f"{p}: format_version {q.get('format_version', 0)} checkpoint has no digests to "
                              "verify (saved by an older moeq); re-save it with this version")
    verify_data(headers)
    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    check_values(key, sf.get_tensor(key), bits_for_key(q, key))
                    n += 1
        except SafetensorError as exc:
            raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from exc
    size = sum(f.stat().st_size for f in files)
    return [f"{p}: OK", f"{len(files)} shard(s), {n} tensors, {size / 2**20:.2f} MiB: config and layout digests "
            "match, data SHA-256 match, scales finite and >= 0, zero points in range, floats finite"]
