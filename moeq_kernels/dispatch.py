"""The measured dispatch table: which backend ``auto`` gives a call that several backends can run.

``moeq_kernels/configs/dispatch.json`` is generated from committed GPU results by
``benchmarks/make_dispatch_table.py`` (never edited by hand; a test regenerates it and compares). Each row is one
measured point: (GPU family, expert-layer shape, token count, online Hadamard) -> the backend that was fastest
there, the kernel path it ran, and the microseconds of every backend timed. ``provenance`` names the source
files (with their sha256), the GPU, the software versions and the date.

Lookup for a call (:func:`choose`), used by :func:`moeq_kernels.backends.backend_for` only when the op has a
table (``fused_experts``), the tensors are on a CUDA device and more than one backend can run the call:

1. GPU family: ``sm<major><minor>`` of the device (H100 / H200: ``sm90``). A family without rows takes the
   measured family nearest in compute capability (nearest major first, then nearest minor, ties to the newer
   one; with only sm90 measured, every GPU uses the sm90 rows), logged once: the
   measured margins are wide (CUDA decode kernel 1.4-2.2x ahead of Triton at T=1, Triton 1.2-2.8x ahead at
   T=16 on H100) for bandwidth-bound kernels, which a neighbouring generation is more likely to repeat than
   the static order ``cuda > triton`` (which is what lost at T=16).
2. Online Hadamard: rows measured with the call's setting, or all rows when none were.
3. Shape class: the measured shape nearest in ``d = sum |log2(a / b)|`` over (E, H, I, k) (the call's missing
   attributes are left out); ties to the shape name sorting first.
4. Token bucket: among that shape's measured T, the one nearest in ``|log2 T - log2 T_row|``; ties go to the
   larger bucket (the CUDA decode kernel's cost grows with ``T * k`` slots, Triton's grouped path much less,
   so an equidistant call is more like the larger measured point). With H100 rows at T = 1 and 16 that sends
   T = 1..3 to the T = 1 row and T = 4..45 to the T = 16 row.

The chosen row's backend is taken only when it is among the backends that can run the call; otherwise the
static order decides. A measured point is thus always chosen exactly as measured (``tests/kernels/
test_dispatch_table.py`` checks every row of the committed results).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).resolve().parent / "configs" / "dispatch.json"
TABLE_VERSION = 1
SHAPE_ATTRS = ("num_experts", "hidden_dim", "intermediate_dim", "top_k")


@dataclass(frozen=True)
class Row:
    """One measured point. ``us``: backend name -> median microseconds at this point (the winner is the
    minimum); ``path``: the winner's kernel path (``decode`` for cuda; ``slot`` / ``grouped`` for triton)."""

    family: str
    shape: str
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    top_k: int
    num_tokens: int
    online_hadamard: bool
    backend: str
    path: str
    us: dict
    source: str

    def dims(self) -> dict:
        return {a: getattr(self, a) for a in SHAPE_ATTRS}


@dataclass(frozen=True)
class Table:
    """The parsed table: ``rows`` in file order, ``provenance`` as written by the generator."""

    op: str
    rows: tuple[Row, ...]
    provenance: dict

    def families(self) -> list[str]:
        return sorted({r.family for r in self.rows})


def parse_table(data: dict) -> Table:
    """A :class:`Table` from the JSON document; ``ValueError`` naming the problem when it is malformed."""
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"dispatch table version {data.get('version')!r} is not {TABLE_VERSION}")
    try:
        rows = tuple(Row(**r) for r in data["rows"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"dispatch table rows do not match the schema ({exc})") from exc
    for r in rows:
        if r.backend not in r.us or r.us[r.backend] != min(r.us.values()):
            raise ValueError(f"dispatch table row {r.family} {r.shape} T={r.num_tokens}: backend {r.backend!r} "
                             f"is not the fastest of {r.us}")
    return Table(data.get("op", "fused_experts"), rows, data.get("provenance", {}))


@functools.lru_cache(maxsize=4)
def load_table(path: str = str(TABLE_PATH)) -> Table:
    """The table at ``path`` (default: the packaged one), parsed once."""
    with open(path, encoding="utf-8") as f:
        return parse_table(json.load(f))


def family_of(major: int, minor: int) -> str:
    """``sm90`` for compute capability 9.0."""
    return f"sm{major}{minor}"


def _capability(family: str) -> tuple[int, int]:
    """(major, minor) of ``sm<major><minor>`` (the minor is one digit: sm90 -> 9.0, sm100 -> 10.0)."""
    digits = family[2:]
    if not family.startswith("sm") or not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"GPU family {family!r} is not sm<major><minor>")
    return int(digits[:-1]), int(digits[-1])


@functools.lru_cache(maxsize=None)
def gpu_family(index: int) -> str:
    """GPU family (``sm<major><minor>``) of CUDA device ``index``."""
    return family_of(*torch.cuda.get_device_capability(index))


_FALLBACK_LOGGED: set[tuple[str, str]] = set()


def nearest_family(table: Table, family: str) -> str | None:
    """``family`` when the table has rows for it, else the nearest measured one (module docstring, step 1)."""
    known = table.families()
    if family in known or not known:
        return family if known else None
    major, minor = _capability(family)

    def gap(f: str) -> tuple:
        m, n = _capability(f)
        return abs(m - major), abs(n - minor), -m, -n  # same generation first, then the nearest minor, then newer

    pick = min(known, key=gap)
    if (family, pick) not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add((family, pick))
        logger.info("moeq dispatch table has no rows for GPU family %s; using the %s rows (nearest measured)",
                    family, pick)
    return pick


def _log2_gap(a: float, b: float) -> float:
    return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))


def nearest_row(table: Table, family: str, attrs: dict) -> Row | None:
    """The measured row standing for a call with these attributes (module docstring, steps 1-4)."""
    fam = nearest_family(table, family)
    rows = [r for r in table.rows if r.family == fam]
    if not rows:
        return None
    had = bool(attrs.get("online_hadamard", False))
    rows = [r for r in rows if r.online_hadamard == had] or rows

    def shape_gap(r: Row) -> float:
        return sum(_log2_gap(attrs[a], getattr(r, a)) for a in SHAPE_ATTRS if attrs.get(a))

    best = min(rows, key=lambda r: (shape_gap(r), r.shape))
    same_shape = [r for r in rows if r.shape == best.shape]
    t = attrs.get("num_tokens", 1)
    return min(same_shape, key=lambda r: (_log2_gap(t, r.num_tokens), -r.num_tokens))


@functools.lru_cache(maxsize=4096)
def _cached_choice(path: str, family: str, key: tuple) -> Row | None:
    return nearest_row(load_table(path), family, dict(key))


def choose(op: str, family: str, candidates: list[str], attrs: dict, path: str = str(TABLE_PATH)) -> str | None:
    """The table's backend for a call of ``op`` on a GPU of ``family``, if it is among ``candidates``.

    Returns None when the table does not cover ``op`` or names a backend that cannot run this call (the
    caller then keeps its static order).
    """
    table = load_table(path)
    if op != table.op:
        return None
    key = tuple(sorted((a, attrs.get(a)) for a in SHAPE_ATTRS + ("num_tokens", "online_hadamard")))
    row = _cached_choice(path, family, key)
    if row is None or row.backend not in candidates:
        return None
    return row.backend
