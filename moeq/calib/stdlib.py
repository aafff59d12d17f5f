"""Offline text everyone has: CPython's standard-library source, split deterministically into train / held-out.

The demo model (``moeq/assets/demo-moe``) is a small byte-level code model trained on the ``train`` split; its
evaluation and plain-text calibration use the same selection, generated at run time instead of committed.

Selection (documented so other tools can reproduce it):

* every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, path relative to that root, ``/``-separated;
* minus directories of tests, vendored or generated data (:data:`EXCLUDED_DIRS`: ``test``, ``tests``,
  ``idle_test``, ``site-packages``, ``encodings`` (machine-generated codec tables), ``pydoc_data``,
  ``__pycache__``) and files over :data:`MAX_FILE_BYTES` (generated tables);
* split by a hash of the relative path: ``sha1(path) % 10 == 0`` is held out, the rest is train. A hash split
  keeps a file on the same side on every Python version that ships it;
* order: by that hash (a fixed pseudo-shuffle, so a ``max_bytes`` prefix mixes packages), files joined with
  one blank line.

The text differs between Python versions (the stdlib changes); numbers recorded in the README name the
version they were measured on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings",
                           "pydoc_data", "__pycache__"})
MAX_FILE_BYTES = 200_000
HELDOUT_MOD = 10
SPLITS = ("train", "heldout")


def _digest(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train", root: str | Path | None = None) -> list[Path]:
    """Absolute paths of the files of ``split`` (``"train"`` or ``"heldout"``), in the documented order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    chosen = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is large
        for name in filenames:
            p = Path(dirpath) / name
            if not name.endswith(".py") or not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
                continue
            rel = p.relative_to(root).as_posix()
            if (_digest(rel) % HELDOUT_MOD == 0) == (split == "heldout"):
                chosen.append((_digest(rel), rel, p))
    if not chosen:
        raise FileNotFoundError(f"no standard-library *.py files found under {root} (split {split!r})")
    chosen.sort()  # by hash, ties (never seen) by path
    return [p for _, _, p in chosen]


def stdlib_text(split: str = "train", max_bytes: int | None = None, root: str | Path | None = None) -> str:
    """The concatenated source text of ``split``; at most ``max_bytes`` UTF-8 bytes when given.

    Files are read as UTF-8 (undecodable bytes replaced) and joined by a blank line; the result is cut at
    ``max_bytes`` (on a character boundary), so a prefix of the selection is returned.
    """
    parts, size = [], 0
    for p in stdlib_files(split, root):
        text = p.read_text(encoding="utf-8", errors="replace").strip("\n") + "\n\n"
        parts.append(text)
        size += len(text.encode("utf-8"))
        if max_bytes is not None and size >= max_bytes:
            break
    out = "".join(parts)
    if max_bytes is not None:
        out = out.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    logger.info("stdlib %s text: %d files, %d bytes", split, len(parts), len(out.encode("utf-8")))
    return out
