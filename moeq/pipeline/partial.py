"""The resumable state of a streaming quantization run: ``.<out>.moeq-partial/`` next to the output.

Layout of the directory (it becomes the checkpoint when the run finishes)::

    progress.json                   fingerprint of the run + one record per finished layer (tensor layout,
                                    module specs, calibration metadata, report lines)
    model-0000<i+1>-of-<N>.safetensors   finished layer i (final bytes except two digests patched at the end)
    inputs-<k>.safetensors          calibration inputs of layer k (``h<j>`` = sample j, ``[1, L, H]``), the
                                    outputs of the finished layers; only when a stage needs activations
                                    (with ``offload_dir`` they are a DiskActivations directory there instead,
                                    named in progress.json)

Every step is ordered so that an interrupt at any moment leaves a state the next run continues from: a layer's
shard and its successor's inputs are fsynced before ``progress.json`` (replaced atomically) records the layer;
a shard or inputs file of an unrecorded layer is simply rewritten. Re-running the same command with the same
source, settings, calibration tokens, dtype and device continues at the first unfinished layer and ends with
the bytes an uninterrupted run writes (every computation is deterministic for fixed inputs and thread count).
A run with different settings refuses to touch the directory and says which setting differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from moeq.io.atomic import write_json, write_safetensors
from moeq.io.source_tensors import ShardReader, read_header
from moeq.pipeline.activations import DiskActivations

logger = logging.getLogger(__name__)

PARTIAL_TAG = ".moeq-partial"
PROGRESS = "progress.json"


def partial_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{PARTIAL_TAG}"


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes (calibration tokens in the fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_digest(path: Path, tensors: dict) -> str:
    """SHA-256 of the source's ``config.json`` and every tensor's file, dtype, shape and byte range (headers
    only: a replaced shard changes them; reading every weight twice would double the run's I/O)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{Path(t.file).name}|{t.dtype}|{tuple(t.shape)}|{t.start}|{t.nbytes}".encode())
    return h.hexdigest()


class PartialRun:
    """Finished layers of one run (see the module docstring).

    Args:
        dest: the output checkpoint directory.
        fingerprint: JSON-able facts that determine the output (source digest, settings, calibration digest,
            dtype, device, threads, versions).
        restart: discard an existing partial run of different settings instead of refusing.
    """

    def __init__(self, dest: Path, fingerprint: dict, restart: bool = False):
        self.dir = partial_dir(dest)
        self.fingerprint = fingerprint
        self.layers: dict[int, dict] = {}
        self.inputs_dirs: dict[int, str] = {}  # layer -> DiskActivations directory of its inputs (offload)
        state = self._read()
        if state is not None and state.get("fingerprint") != fingerprint:
            if not restart:
                raise ValueError(f"{self.dir} holds an unfinished run with other settings "
                                 f"({_difference(state.get('fingerprint') or {}, fingerprint)}); re-run with the "
                                 "same settings to continue it, or pass --restart to discard it")
            logger.warning("discarding the unfinished run in %s (other settings)", self.dir)
            state = None
        if state is None and self.dir.exists():
            shutil.rmtree(self.dir)
        if state is None:
            self.dir.mkdir(parents=True)
            self._write()
        else:
            self.layers = {int(k): v for k, v in state["layers"].items()}
            self.inputs_dirs = {int(k): v for k, v in state.get("inputs_dirs", {}).items()}
            logger.info("resuming %s: %d layer(s) already done", self.dir, len(self.layers))

    def _read(self) -> dict | None:
        f = self.dir / PROGRESS
        if not f.is_file():
            return None
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s is unreadable: starting over", f)
            return None
        return state if isinstance(state, dict) and isinstance(state.get("layers"), dict) else None

    def _write(self) -> None:
        tmp = self.dir / (PROGRESS + ".tmp")
        write_json(tmp, {"fingerprint": self.fingerprint, "layers": {str(k): v for k, v in sorted(self.layers.items())},
                         "inputs_dirs": {str(k): v for k, v in self.inputs_dirs.items()}})
        os.replace(tmp, self.dir / PROGRESS)

    @property
    def next_layer(self) -> int:
        """The first layer not finished (layers finish in order)."""
        k = 0
        while k in self.layers:
            k += 1
        return k

    def finish_layer(self, idx: int, record: dict, next_inputs) -> None:
        """Record layer ``idx`` (its shard is written); ``next_inputs`` are the calibration inputs of layer
        ``idx + 1``, a list (saved here first) or a :class:`DiskActivations` (already on disk), or None. The
        previous inputs are removed after the record."""
        self.inputs_dirs = {}
        if isinstance(next_inputs, DiskActivations):  # the caller removes the previous generation afterwards
            self.inputs_dirs = {idx + 1: str(next_inputs.dir)}
        elif next_inputs is not None:
            write_safetensors(self.inputs_path(idx + 1), {f"h{j}": h.contiguous() for j, h in enumerate(next_inputs)}, {})
        self.layers[idx] = record
        self._write()
        old = self.inputs_path(idx)
        if old.exists():
            old.unlink()

    def inputs_path(self, idx: int) -> Path:
        return self.dir / f"inputs-{idx:05d}.safetensors"

    def load_inputs(self, idx: int):
        """The saved calibration inputs of layer ``idx`` (``[1, L, H]`` per sample, in sample order): a list,
        or the :class:`DiskActivations` an offloaded run left."""
        if idx in self.inputs_dirs:
            return DiskActivations(Path(self.inputs_dirs[idx]), fresh=False)
        path = self.inputs_path(idx)
        if not path.is_file():
            raise ValueError(f"{path} is missing: the unfinished run cannot continue (pass --restart)")
        found, _ = read_header(path)
        with ShardReader() as reader:
            return [reader.read(found[f"h{j}"]) for j in range(len(found))]

    def clean(self) -> None:
        """Remove the run's own bookkeeping before the directory becomes the checkpoint."""
        (self.dir / PROGRESS).unlink(missing_ok=True)
        for f in self.dir.glob("inputs-*.safetensors"):
            f.unlink()
        for d in self.inputs_dirs.values():
            if Path(d).is_dir():
                DiskActivations(Path(d), fresh=False).remove()


def _difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "unknown difference"
    k = keys[0]
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"{k}: {_short(old.get(k))} then, {_short(new.get(k))} now{more}"


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."
