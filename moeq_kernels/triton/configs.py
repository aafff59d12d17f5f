"""Launch configurations of the Triton MoE kernels: what they are, where they come from, how to pin them.

A :class:`KernelConfig` fixes everything a call of :func:`moeq_kernels.triton.moe_gemm.fused_experts_triton`
launches: the path (``"slot"``: one program per routed (token, expert) slot, GEMV-style, for decode;
``"grouped"``: slots sorted by expert with ``moe_align``, ``tl.dot`` tiles, for prefill) and the tile of each
GEMM. Lookup order for a call with shape ``(E, H, I, k)`` and ``T`` tokens:

1. a config passed explicitly (``fused_experts_triton(..., config=cfg)``);
2. a config pinned process-wide with :func:`pin_config` (or the :func:`pinned` context manager);
3. the JSON table: the packaged ``moeq_kernels/configs/triton_moe.json``, overlaid by the file named in
   the environment variable ``MOEQ_TRITON_MOE_CONFIGS`` (same schema) when it is set;
4. :func:`default_config`, a heuristic.

JSON schema (``version`` 1)::

    {"version": 1,
     "entries": {"E8_H4096_I14336_k2": {"1": {<KernelConfig fields>}, "16": {...}, "2048": {...}}}}

The inner keys are token-count buckets: a call with ``T`` tokens uses the smallest bucket ``>= T``
(the largest bucket when ``T`` exceeds all of them). ``KernelConfig`` fields: ``path``, ``gate_up`` and
``down`` (each a :class:`GemmTile` dict; missing keys take the dataclass defaults), ``hadamard_warps``
(0 = automatic), ``hadamard`` (where the online Hadamard runs, see :data:`HADAMARD_MODES`),
``hadamard_block_n`` (outputs per program of the fused variant).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_TABLE = "MOEQ_TRITON_MOE_CONFIGS"
PACKAGED_TABLE = Path(__file__).resolve().parent.parent / "configs" / "triton_moe.json"
PATHS = ("slot", "grouped")
# Where the online Hadamard on the down input runs (only read when a call asks for it):
# "pass": its own launch rotating h in place between gate_up and down (moe_hadamard.rotate_rows_), the
#   path measured on H100 (benchmarks/results/h100-2026-11-23: +1-3% of the layer at T >= 16, +2.2-5.5 us
#   at T = 1);
# "fused": the slot-path down kernel rotates the rows it reads in its prologue (moe_decode, unmeasured on
#   GPU: the rotated activations never leave registers, one launch fewer, the rotation recomputed by every
#   down program). Slot path only; why not for the grouped path: moe_hadamard's module docstring.
HADAMARD_MODES = ("pass", "fused")
# Tile widths along K the kernels are built for: powers of two, >= 16 (tl.dot's minimum K), <= 512
# (a [BLOCK_N, 512] fp32 dequantized tile is already 64 registers per thread at 4 warps and BLOCK_N=16).
BLOCK_K_CHOICES = (512, 256, 128, 64, 32, 16)


@dataclass(frozen=True)
class GemmTile:
    """Tile of one GEMM launch. ``block_m`` is used by the grouped path only (slots per program, the
    ``moe_align`` padding unit, >= 16 for ``tl.dot``); ``split_k`` by the grouped down GEMM only."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class KernelConfig:
    """Everything one fused-experts call launches (see the module docstring)."""

    path: str = "grouped"
    gate_up: GemmTile = field(default_factory=GemmTile)
    down: GemmTile = field(default_factory=GemmTile)
    hadamard_warps: int = 0  # 0: moe_hadamard.rotate_rows_ picks from the tile size
    hadamard: str = "pass"  # one of HADAMARD_MODES
    # Outputs per program of the fused-Hadamard down kernel (its weight tile is [hadamard_block_n, 16, c]:
    # 8 x 16 x 32 = 4K fp32, the size of the plain slot kernel's 16 x 256 tile; unmeasured, to tune on H100).
    hadamard_block_n: int = 8

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"KernelConfig.path must be one of {PATHS}, got {self.path!r}")
        if self.hadamard not in HADAMARD_MODES:
            raise ValueError(f"KernelConfig.hadamard must be one of {HADAMARD_MODES}, got {self.hadamard!r}")
        if self.hadamard_block_n < 1 or self.hadamard_block_n & (self.hadamard_block_n - 1):
            raise ValueError(f"hadamard_block_n={self.hadamard_block_n} must be a power of two")
        if self.hadamard == "fused" and self.path != "slot":
            raise ValueError("KernelConfig.hadamard='fused' exists for the slot path only: a grouped down program "
                             "would redo the rotation of all its BLOCK_M rows (see moe_hadamard); use 'pass'")
        for tile in (self.gate_up, self.down):
            for name in ("block_m", "block_n", "block_k"):
                v = getattr(tile, name)
                if v < 1 or v & (v - 1):
                    raise ValueError(f"{name}={v} must be a power of two")
            if self.path == "grouped" and min(tile.block_m, tile.block_n, tile.block_k) < 16:
                raise ValueError(f"grouped tiles need block_m, block_n, block_k >= 16 (tl.dot), got {tile}")
            if tile.split_k < 1:
                raise ValueError(f"split_k must be >= 1, got {tile.split_k}")
        if self.path == "grouped" and self.gate_up.block_m != self.down.block_m:
            # One moe_align (one padding unit) feeds both GEMMs.
            raise ValueError(f"grouped path needs gate_up.block_m == down.block_m, got "
                             f"{self.gate_up.block_m} and {self.down.block_m}")

    def to_dict(self) -> dict:
        """Plain dict in the JSON table's schema."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        d = dict(d)
        for name in ("gate_up", "down"):
            if name in d:
                d[name] = GemmTile(**d[name])
        return cls(**d)


_PINNED: KernelConfig | None = None


def pin_config(cfg: KernelConfig | None) -> None:
    """Use ``cfg`` for every call in this process (``None`` unpins). Tuning and benchmarks use this."""
    global _PINNED
    _PINNED = cfg


@contextlib.contextmanager
def pinned(cfg: KernelConfig):
    """Context manager form of :func:`pin_config`; restores the previous pin on exit."""
    prev = _PINNED
    pin_config(cfg)
    try:
        yield cfg
    finally:
        pin_config(prev)


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int) -> str:
    """Table key of an expert-layer shape, e.g. ``E8_H4096_I14336_k2``."""
    return f"E{num_experts}_H{hidden}_I{inter}_k{top_k}"


@functools.lru_cache(maxsize=4)
def _read_table(path: str, mtime: float) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != 1:
        raise ValueError(f"{path}: unsupported config table version {data.get('version')!r} (expected 1)")
    return data.get("entries", {})


def _table() -> dict:
    entries: dict = {}
    paths = [str(PACKAGED_TABLE)] + ([os.environ[ENV_TABLE]] if os.environ.get(ENV_TABLE) else [])
    for p in paths:
        if not os.path.exists(p):
            if p != str(PACKAGED_TABLE):
                logger.warning("%s=%s does not exist; ignoring it", ENV_TABLE, p)
            continue
        for key, buckets in _read_table(p, os.path.getmtime(p)).items():
            entries.setdefault(key, {}).update(buckets)
    return entries


def _from_table(key: str, num_tokens: int) -> KernelConfig | None:
    buckets = _table().get(key)
    if not buckets:
        return None
    sizes = sorted(int(b) for b in buckets)
    pick = next((b for b in sizes if b >= num_tokens), sizes[-1])
    return KernelConfig.from_dict(buckets[str(pick)])


def default_config(num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int) -> KernelConfig:
    """Heuristic config (every constant here is unmeasured, to tune on H100 with the GPU script).

    Path: ``slot`` while the routed slots do not outnumber the experts (``T*k <= E``): then few experts
    are hit twice, so reading an expert's weights once per slot costs little extra and saves the routing
    sort, its launch and the reduction launch. Beyond that, ``grouped``, with ``block_m`` following the
    mean number of slots per expert so that padded rows stay a small fraction.
    """
    slots = num_tokens * top_k
    if slots <= num_experts:
        # GEMV tiles: BLOCK_K = 256 reads 128 contiguous bytes of INT4 per row per iteration; small BLOCK_N
        # gives many programs so that T=1 with 2 experts still spreads over all SMs (Mixtral: 2 slots *
        # 14336/16 = 1792 gate_up programs, 4096/16 = 256 down programs). The [BLOCK_N, BLOCK_K] fp32
        # accumulators (two in gate_up) cost 32 registers per thread each at 4 warps.
        return KernelConfig(
            path="slot",
            gate_up=GemmTile(block_n=16, block_k=256, num_warps=4, num_stages=3),
            down=GemmTile(block_n=16, block_k=256, num_warps=4, num_stages=3),
        )
    per_expert = slots / num_experts
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 96 else 128
    big = bm >= 64
    # Two fp32 accumulators (gate and up) of [bm, bn]: keep bm*bn*2 <= 16K fp32 per program.
    gate_up = GemmTile(block_m=bm, block_n=64 if bm == 128 else 128 if big else 64, block_k=64 if big else 128,
                       num_warps=8 if big else 4, num_stages=3)
    down = GemmTile(block_m=bm, block_n=128 if big else 64, block_k=64 if big else 128,
                    num_warps=8 if big else 4, num_stages=3)
    return KernelConfig(path="grouped", gate_up=gate_up, down=down)


def pinned_config() -> KernelConfig | None:
    """The config pinned with :func:`pin_config`, or None."""
    return _PINNED


def w4a8_default_config(num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int) -> KernelConfig:
    """Heuristic tiles of the W4A8 grouped kernels (``moe_w4a8``), at every T (W4A8 has no slot path).

    ``block_m`` follows the mean slots per expert as in :func:`default_config`, capped at 64; ``block_k`` 128 (a
    g128 group per tile: one scale FMA pass per 128 MACs); ``block_n`` 64. Warps: 4 at ``block_m`` 16, else 8.
    Chosen because they compile for sm_90 without register spills, but for asymmetric zeros at ``block_m`` 64
    (72 bytes per thread in gate_up) (static compile of candidate tiles with
    ``tests/kernels/triton_compile_sm90.py``'s recorder, 2026-12-02; the chosen ones are listed in
    benchmarks/results/triton_sm90_resources.md), where e.g. 128 x 64 x 64 at 8 warps and 2 stages spills 136 bytes
    per thread in gate_up, 64 x 64 x 128 at 4 warps 816 / 488 (gate_up / down), 32 x 64 x 128 at 4 warps 48 / 0.
    Their speed is unmeasured: a starting point to tune on a GPU. The JSON table is not read: its entries were
    measured for the W4A16 kernels.
    """
    per_expert = num_tokens * top_k / num_experts
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    tile = GemmTile(block_m=bm, block_n=64, block_k=128, num_warps=4 if bm == 16 else 8, num_stages=3)
    return KernelConfig(path="grouped", gate_up=tile, down=tile)


def select_config(num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int,
                  explicit: KernelConfig | None = None) -> KernelConfig:
    """The config a call uses (lookup order in the module docstring)."""
    if explicit is not None:
        return explicit
    if _PINNED is not None:
        return _PINNED
    cfg = _from_table(shape_key(num_experts, hidden, inter, top_k), num_tokens)
    return cfg if cfg is not None else default_config(num_experts, hidden, inter, top_k, num_tokens)


def fit_block_k(requested: int, k: int, group: int) -> int | None:
    """Largest ``BLOCK_K <= requested`` from :data:`BLOCK_K_CHOICES` with ``k % BLOCK_K == 0`` and tiles
    aligned to quantization groups (``group % BLOCK_K == 0`` or ``BLOCK_K % group == 0``); None if none.

    Args:
        requested: the config's ``block_k``.
        k: the GEMM's reduction length (H for gate_up, I for down).
        group: group size in input features (``k`` for per-channel).
    """
    for bk in BLOCK_K_CHOICES:
        if bk <= max(requested, BLOCK_K_CHOICES[-1]) and k % bk == 0 and (group % bk == 0 or bk % group == 0):
            return bk
    return None


def fit_block_k_w4a8(requested: int, k: int, group: int) -> int | None:
    """K tile of the W4A8 GEMMs (``moe_w4a8``): :func:`fit_block_k` capped at the group size (a tile lies in
    one quantization group, so one weight scale per output column multiplies its dot) and at least 32 (the
    smallest K of an 8-bit ``tl.dot``); None if none fits.

    Args as :func:`fit_block_k`.
    """
    bk = fit_block_k(min(requested, group), k, group)
    return bk if bk is not None and bk >= 32 and group % bk == 0 else None


# The two-factor row tilings of the MoE online Hadamard (the op moeq::hadamard_transform has its own
# three-factor tiling, triton/hadamard.tile_config: a different kernel, not interchangeable without changing
# its arithmetic). Both views split a row of length n = r * c into X [r, c] (c a power of two dividing the
# 2^k part of n), so x @ H_n = vec(H_r^T X H_c), and both pick c by one rule, two_factor_split:
#   * the separate pass (moe_hadamard.rotate_rows_): c in 1..2^k, padded tile <= MAX_ROTATION_TILE;
#   * the fused down-kernel prologue (moe_decode._down_slot_rot_kernel): c in 16..FUSED_MAX_C, no tile limit.
# Largest padded row the separate pass holds in registers (Mixtral's 128 x 128); unmeasured, to tune on H100.
MAX_ROTATION_TILE = 16384
# Rows of the rotated tile produced per K step of the fused down kernel: 16 is tl.dot's minimum N.
FUSED_ROW_BLOCK = 16
# Widest Sylvester factor the fused kernel holds ([c, c] in registers, and a [BLOCK_N, 16, c] weight tile).
FUSED_MAX_C = 128


def two_factor_split(n: int, c_min: int, c_max: int | None, max_tile: int | None) -> tuple[int, int, int, int] | None:
    """``(r, c, r_pad, c_pad)`` tiling a length-``n`` row as ``X [r, c]``, or None when no ``c`` qualifies.

    ``c`` runs over the powers of two in ``[c_min, min(c_max, 2^k)]`` (``2^k`` the power-of-two factor of
    ``n``); each axis pads to a power of two >= 16 (tl.dot's minimum). The choice minimizes
    ``(r_pad + c_pad, r_pad * c_pad)`` (per element, the two contractions cost ``r_pad + c_pad``
    multiply-adds; then the smaller tile), the smaller ``c`` on ties, among tiles of at most ``max_tile``
    padded values. ``ValueError`` when ``n`` has no supported Hadamard order.
    """
    from moeq_kernels.hadamard import hadamard_factors

    _, p = hadamard_factors(n)
    best = None
    c = c_min
    while c <= (p if c_max is None else min(p, c_max)):
        r = n // c
        r_pad, c_pad = max(16, 1 << (r - 1).bit_length()), max(16, c)
        cost = (r_pad + c_pad, r_pad * c_pad)
        if (max_tile is None or r_pad * c_pad <= max_tile) and (best is None or cost < best[0]):
            best = (cost, (r, c, r_pad, c_pad))
        c *= 2
    return None if best is None else best[1]


@dataclass(frozen=True)
class RotationPlan:
    """How a row of length ``n`` is tiled: ``n = r * c``, padded to ``r_pad x c_pad``."""

    n: int
    r: int
    c: int
    r_pad: int
    c_pad: int


@functools.lru_cache(maxsize=None)
def rotation_plan(n: int) -> RotationPlan:
    """The separate pass's tiling of a length-``n`` row; ``ValueError`` if ``n`` has no supported Hadamard
    order or no tile fits :data:`MAX_ROTATION_TILE`."""
    split = two_factor_split(n, 1, None, MAX_ROTATION_TILE)
    if split is None:
        raise ValueError(f"Hadamard size {n} needs more than {MAX_ROTATION_TILE} padded values per row")
    return RotationPlan(n, *split)


@dataclass(frozen=True)
class FusedRotationPlan:
    """Tiling of a length-``n`` row inside the fused down kernel: ``n = r * c``, the row viewed as
    ``X [r, c]`` and padded to ``[r_pad, c]``, rotated in chunks of ``rb`` rows of ``X`` (the K tile of the
    down GEMV is ``rb * c`` input features)."""

    n: int
    r: int
    c: int
    r_pad: int
    rb: int


@functools.lru_cache(maxsize=None)
def fused_rotation_plan(n: int) -> FusedRotationPlan:
    """The fused kernel's tiling of a length-``n`` row; ``ValueError`` naming the problem if it has none.

    :func:`two_factor_split` with ``16 <= c <= FUSED_MAX_C`` (``c`` is unpadded there), so every down program
    pays ``n * (c + r_pad)`` multiply-adds per row (Qwen3 768 -> 24(32) x 32, DeepSeek 1408 -> 44(64) x 32,
    OLMoE 1024 -> 32 x 32, Mixtral 14336 -> 112(128) x 128).
    """
    split = two_factor_split(n, 16, FUSED_MAX_C, None)
    if split is None:
        from moeq_kernels.hadamard import hadamard_factors

        raise ValueError(f"fused online Hadamard of size {n}: its power-of-two factor {hadamard_factors(n)[1]} "
                         "is under 16")
    r, c, r_pad, _ = split
    return FusedRotationPlan(n, r, c, r_pad, FUSED_ROW_BLOCK)


def plan_reason(n: int) -> str | None:
    """None when :func:`moeq_kernels.triton.moe_hadamard.rotate_rows_` supports rows of length ``n``, else why not."""
    try:
        rotation_plan(n)
    except ValueError as exc:
        return f"online Hadamard of size {n}: {exc}"
    return None
