"""Calibration activations kept on disk instead of in memory (``quantize_checkpoint(offload_dir=...)``).

Between two decoder layers the pipeline holds the calibration hidden states, ``[1, L, H]`` per sample: for
DeepSeek-V3 (H = 7168) with 512 samples x 2048 tokens that is 15 GB in bf16. :class:`DiskActivations` is a
sequence of them stored one file per sample (moeq's deterministic safetensors writer, fsynced), so memory
holds one sample at a time; the previous generation is deleted once the next layer is recorded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moeq.io.atomic import write_safetensors
from moeq.io.source_tensors import ShardReader, read_header

_NAME = "hidden"


class DiskActivations:
    """A list-like of tensors ``[1, L, H]`` (one file per item in ``directory``): ``append`` writes, indexing
    and iteration read one item at a time.

    Args:
        directory: created empty when ``fresh`` (an existing one is cleared), else opened as it is.
    """

    def __init__(self, directory: Path, fresh: bool = True):
        self.dir = Path(directory)
        if fresh:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
        elif not self.dir.is_dir():
            raise ValueError(f"{self.dir}: saved calibration activations are missing (pass --restart)")
        self._n = len(list(self.dir.glob("h*.safetensors")))

    def _path(self, j: int) -> Path:
        return self.dir / f"h{j:06d}.safetensors"

    def append(self, t: torch.Tensor) -> None:
        write_safetensors(self._path(self._n), {_NAME: t.detach().cpu().contiguous()}, {})
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self._n:
            raise IndexError(j)
        path = self._path(j)
        info = read_header(path)[0][_NAME]
        with ShardReader() as reader:
            return reader.read(info)

    def __iter__(self):
        for j in range(self._n):
            yield self[j]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
