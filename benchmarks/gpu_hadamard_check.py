"""GPU check and timing of moeq's Triton Hadamard transform (bf16) against a dense matmul and
fast-hadamard-transform (when importable). Self-contained (puts the checkout on sys.path); on a CUDA GPU:

    python benchmarks/gpu_hadamard_check.py            # under 3 minutes on an H100 (compiles included)

Per dim n in {1024, 4096, 768, 14336, 1408, 2048, 7168} and rows in {16, 16384} (bf16 ``x [rows, n]``):
  * correctness of the compiled kernel (default 2 bf16 operand splits, and the 1-split "fast" variant)
    against the fp32 reference ``hadamard_ref`` (itself checked against a float64 dense ``x @ H_n`` on 16
    rows), plus float16/float32 I/O at 16 rows and one call through the op ``moeq::hadamard_transform``;
  * median time (CUDA-graph replays, ``triton.testing.do_bench_cudagraph``) of: the kernel, the fast
    variant, ``x @ (H_n / sqrt(n))`` in bf16, and fast-hadamard-transform;
  * achieved GB/s and the memory floor (read + write of x at 3.0 TB/s, the H100 copy ceiling in ANCHORS);
  * a launch sweep (rows per program x num_warps) at 16384 rows, to tune ``tile_config``'s defaults
    (skipped past a time budget).
Results (JSON + markdown, with GPU, versions, commit, date) go to ``$OUT`` if set, else
``benchmarks/results/``; the markdown table is written to stdout last. One failing case is recorded and
the rest go on; the exit status is 1 when any correctness check failed.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moeq_kernels.hadamard import hadamard_matrix, hadamard_transform_op  # noqa: E402
from moeq_kernels.reference.hadamard import hadamard_ref  # noqa: E402
from moeq_kernels.triton.hadamard import hadamard_triton, register_hadamard_triton, tile_config  # noqa: E402

logger = logging.getLogger("gpu_hadamard_check")
DEVICE = "cuda"
DIMS = [1024, 4096, 768, 14336, 1408, 2048, 7168]
SWEEP_DIMS = [14336, 4096, 1408, 768]
ROWS = [16, 16384]
COPY_BYTES_PER_S = 3.0e12
REP_MS = 40
DEADLINE_S = 120.0  # stop timing (not checking) past this, to stay under 3 minutes
BF16_EPS = torch.finfo(torch.bfloat16).eps


def _fht():
    """fast-hadamard-transform's functions by base m (1 = power of two), or {} when not importable."""
    try:
        import fast_hadamard_transform as fht
    except ImportError:
        return {}
    fns = {1: fht.hadamard_transform}
    for m in (12, 20, 28, 40):
        fn = getattr(fht, f"hadamard_transform_{m}N", None)
        if fn is not None:
            fns[m] = fn
    return fns


def _median_us(fn) -> float:
    try:
        return 1e3 * do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")
    except Exception as exc:  # capture can fail for a third-party kernel: fall back to stream timing
        logger.warning("CUDA-graph timing failed (%s); using do_bench", exc)
        return 1e3 * do_bench(fn, rep=REP_MS, return_mode="median")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_dim(n: int, fht: dict) -> list[dict]:
    """Correctness checks that do not depend on the row count (16 rows; fp16/fp32 I/O; the op; oracle)."""
    out = []
    scale = 1 / math.sqrt(n)
    h64 = hadamard_matrix(n, device=DEVICE)

    def dense(x: torch.Tensor) -> torch.Tensor:
        return x.double() @ h64 * scale

    x32 = torch.randn(16, n, device=DEVICE)
    out.append({"n": n, "check": "reference fp32 vs float64 dense",
                "err": _rel_err(hadamard_ref(x32, scale), dense(x32)), "bound": 1e-5})
    for dtype in (torch.float16, torch.float32):
        x = x32.to(dtype)
        out.append({"n": n, "check": f"triton {dtype} I/O", "err": _rel_err(hadamard_triton(x, scale), dense(x)),
                    "bound": 2 * torch.finfo(dtype).eps + 1e-5})
    xb = x32.to(torch.bfloat16)
    y_op = hadamard_transform_op(xb, scale, "triton")
    out.append({"n": n, "check": "op backend='triton' bf16", "err": _rel_err(y_op, dense(xb)), "bound": 2 * BF16_EPS})
    m = tile_config(n).m
    if m == 1 and 1 in fht:
        out.append({"n": n, "check": "fast-hadamard-transform vs moeq (same Sylvester H)",
                    "err": _rel_err(fht[1](xb, scale), y_op), "bound": 2 * BF16_EPS})
    return out


def time_case(n: int, rows: int, fht: dict, timing: bool) -> dict:
    """Correctness at ``rows`` (default and fast variants) and, when ``timing``, the medians."""
    scale = 1 / math.sqrt(n)
    x = torch.randn(rows, n, device=DEVICE).to(torch.bfloat16)
    ref = hadamard_ref(x.float(), scale)
    rec = {"n": n, "rows": rows, "factors": tile_config(n).true, "floor_us": 4 * rows * n / COPY_BYTES_PER_S * 1e6,
           "err": _rel_err(hadamard_triton(x, scale), ref),
           "err_fast": _rel_err(hadamard_triton(x, scale, splits=1), ref)}
    rec["ok"] = rec["err"] <= 2 * BF16_EPS
    if not timing:
        return rec
    rec["triton_us"] = _median_us(lambda: hadamard_triton(x, scale))
    rec["triton_fast_us"] = _median_us(lambda: hadamard_triton(x, scale, splits=1))
    h = (hadamard_matrix(n, device=DEVICE) * scale).to(torch.bfloat16)
    rec["dense_us"] = _median_us(lambda: x @ h)
    del h
    fn = fht.get(tile_config(n).m)
    if fn is not None:
        rec["fht_us"] = _median_us(lambda: fn(x, scale))
    rec["triton_GBps"] = 4 * rows * n / rec["triton_us"] / 1e3
    return rec


def sweep(n: int, rows: int) -> list[dict]:
    """Launch configurations (rows per program x num_warps) around the default, for tuning ``tile_config``."""
    cfg = tile_config(n)
    scale = 1 / math.sqrt(n)
    x = torch.randn(rows, n, device=DEVICE).to(torch.bfloat16)
    out = []
    for r in (cfg.rows, 2 * cfg.rows, 4 * cfg.rows):
        for warps in (4, 8, 16):
            rec = {"n": n, "rows": rows, "rows_per_program": r, "num_warps": warps,
                   "default": (r, warps) == (cfg.rows, cfg.num_warps)}
            try:
                hadamard_triton(x, scale, rows_per_program=r, num_warps=warps)
                rec["us"] = _median_us(lambda: hadamard_triton(x, scale, rows_per_program=r, num_warps=warps))
            except Exception as exc:  # too many registers / shared memory for this combination
                rec["error"] = repr(exc)[:200]
            out.append(rec)
    return out


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def markdown(meta: dict, cases: list[dict], checks: list[dict], sweeps: list[dict]) -> str:
    lines = [f"# Hadamard transform (bf16), {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']}, {meta['date']}", "",
             "| n | factors | rows | floor us | triton us | GB/s | fast (1 split) us | dense us | fht us "
             "| err | err fast | ok |", "|" + "---|" * 12]
    for c in cases:
        if "error" in c:
            lines.append(f"| {c['n']} | | {c['rows']} | | FAILED: {c['error'][:80]} | | | | | | | no |")
            continue
        lines.append("| " + " | ".join([str(c["n"]), "x".join(map(str, c["factors"])), str(c["rows"]),
                     _fmt(c["floor_us"]), _fmt(c.get("triton_us")), _fmt(c.get("triton_GBps"), ".0f"),
                     _fmt(c.get("triton_fast_us")), _fmt(c.get("dense_us")), _fmt(c.get("fht_us")),
                     _fmt(c["err"], ".2e"), _fmt(c["err_fast"], ".2e"), "yes" if c["ok"] else "NO"]) + " |")
    if sweeps:
        lines += ["", "Launch sweep (bf16, us; * = default):", "",
                  "| n | rows | rows/program | warps | us |", "|---|---|---|---|---|"]
        lines += [f"| {w['n']} | {w['rows']} | {w['rows_per_program']} | {w['num_warps']} | "
                  f"{_fmt(w.get('us')) if 'error' not in w else 'failed'}{' *' if w['default'] else ''} |"
                  for w in sweeps]
    bad = [k for k in checks if not k.get("ok")]
    lines += ["", f"Other checks: {len(checks) - len(bad)}/{len(checks)} passed."]
    lines += [f"- FAILED n={k['n']} {k['check']}: {k.get('error') or _fmt(k.get('err'), '.2e')}" for k in bad]
    return "\n".join(lines) + "\n"


def _meta() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        logger.error("needs a CUDA GPU")
        return 2
    register_hadamard_triton()
    torch.manual_seed(0)
    fht, start, cases, checks = _fht(), time.time(), [], []
    logger.info("fast-hadamard-transform: %s", sorted(fht) or "not importable")
    for n in DIMS:
        try:
            checks += [dict(k, ok=k["err"] <= k["bound"]) for k in check_dim(n, fht)]
        except Exception as exc:  # one broken size must not hide the others
            logger.exception("checks for n=%d failed", n)
            checks.append({"n": n, "check": "all", "ok": False, "error": repr(exc)})
        for rows in ROWS:
            try:
                cases.append(time_case(n, rows, fht, timing=time.time() - start < DEADLINE_S))
            except Exception as exc:
                logger.exception("case n=%d rows=%d failed", n, rows)
                cases.append({"n": n, "rows": rows, "ok": False, "error": repr(exc)})
            logger.info("n=%d rows=%d: %s", n, rows, {k: v for k, v in cases[-1].items() if k != "factors"})
            torch.cuda.empty_cache()
    sweeps = []
    for n in SWEEP_DIMS:
        if time.time() - start > DEADLINE_S:
            logger.warning("time budget spent: launch sweep stopped before n=%d", n)
            break
        try:
            sweeps += sweep(n, ROWS[-1])
        except Exception:  # the sweep is advisory; its failure must not lose the results above
            logger.exception("sweep n=%d failed", n)
    meta = _meta()
    text = markdown(meta, cases, checks, sweeps)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "hadamard_" + meta["date"].replace(":", "")
    record = {"meta": meta, "cases": cases, "checks": checks, "sweeps": sweeps}
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"{stem}.md").write_text(text)
    logger.info("wrote %s/%s.{json,md} in %.0f s", out_dir, stem, time.time() - start)
    sys.stdout.write(text)  # the result table, last
    return 0 if all(c.get("ok") for c in cases + checks) else 1


if __name__ == "__main__":
    sys.exit(main())
