"""Shared pieces of moeq's benchmarks: run header, output folder, random packed weights, routing, timers.

Timing follows the project's method (ANCHORS.md, the device METHOD.md): medians; CUDA-graph replays for
anything capturable (``triton.testing.do_bench_cudagraph``), events around eager calls otherwise; every timed
call cycles over several fresh random input sets so small experts are not served from L2; never zeros.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

logger = logging.getLogger("moeq.benchmarks")

REPO = Path(__file__).resolve().parents[1]

try:
    from triton.errors import TritonError
except ImportError:  # no triton: nothing can raise its errors
    TritonError = RuntimeError
# What a failing benchmark case may raise; the harnesses record it and go on (torch's OOM, dynamo and inductor
# errors are RuntimeErrors; Triton compile / resource errors derive from TritonError, not RuntimeError).
CASE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError, NotImplementedError,
               TritonError)
# Ceilings of the anchors' H100 (ANCHORS.md): device-to-device copy and bf16 dense matmul. Floors use these
# so numbers compare across runs; the copy bandwidth measured in each run is recorded beside them.
ANCHOR_BW = 3.0e12  # bytes/s
ANCHOR_FLOPS = 738e12  # flop/s


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: unchanged), restoring the previous count.

    Quick mode uses 1: on a small shared CI machine, OpenMP threads competing with other processes make
    CPU timings (and the wall time of the run) swing by 10x.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def device_name(device: torch.device) -> str:
    """GPU name, or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_out_dir(device: torch.device) -> Path:
    """``benchmarks/results/<gpu-name-or-cpu>/`` with the name made filesystem-safe."""
    return REPO / "benchmarks" / "results" / re.sub(r"[^A-Za-z0-9._-]+", "_", device_name(device))


def git_commit(root: Path | str = REPO) -> str:
    """``HEAD`` of the checkout at ``root`` (default: this one), with ``+dirty`` when tracked files differ;
    ``"unknown"`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def env_header(device: torch.device) -> dict:
    """What every result file records: device, versions, commit, date."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton_version, "transformers": transformers.__version__,
        "python": platform.python_version(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median of 10)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = median_event_ms(lambda: dst.copy_(src), iters=10)
        sec = ms / 1e3
    else:
        sec = time_cpu(lambda: dst.copy_(src), iters=5, warmup=1) / 1e6
    return 2 * nbytes / sec


# ----------------------------------------------------------------------------------------------- inputs


def random_routing(t: int, e: int, k: int, dtype: torch.dtype, device, gen: torch.Generator | None = None):
    """Random top-k routing like a real router's: softmax of Gaussian logits, top-k, renormalized.

    Returns ``(top_k_index int64 [t, k], top_k_weights dtype [t, k])``.
    """
    logits = torch.randn(t, e, device=device, generator=gen, dtype=torch.float32)
    w, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def fill_random_packed_(module, scale_std: float = 0.01) -> None:
    """Fill a ``QuantizedExperts``' buffers in place: uniform random 4-bit codes (random bytes viewed as int32
    words), scales ``N(0, 1) * scale_std`` in the scale dtype, random zero points if asymmetric.

    In place and expert by expert, so no bf16 (or even second packed) copy of the weights ever exists.
    """
    with torch.no_grad():
        for prefix in ("w13", "w2"):
            q, s, z = (getattr(module, f"{prefix}_{f}") for f in ("qweight", "scales", "qzeros"))
            for e in range(q.shape[0]):
                q[e].view(torch.uint8).random_(0, 256)
                s[e].normal_(0.0, scale_std)
                if z is not None:
                    z[e].random_(0, 1 << getattr(module, f"{prefix}_spec").bits)


def tensor_nbytes(tensors: Sequence[torch.Tensor | None]) -> int:
    """Bytes of the given tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN/inf anywhere gives ``inf`` (never passes a threshold)."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------- timers


def median_event_ms(fn: Callable, iters: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events, after one warm-up call (host work included, so it
    also times what cannot be graph-captured, e.g. the eager per-expert loop)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn: Callable, iters: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in microseconds (host clock; CPU work is synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_graph(fn: Callable, rep_ms: int = 25) -> float:
    """Median microseconds of ``fn()`` replayed from a CUDA graph (``do_bench_cudagraph``).

    ``fn`` must be capturable (no host syncs); compile / autotune it before calling this.
    """
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()  # do_bench_cudagraph works on a fresh side stream that does not wait for ours
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def time_eager(fn: Callable, rep_ms: int = 50) -> float:
    """Median microseconds of eager ``fn()`` calls (``do_bench``: events, L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


# ----------------------------------------------------------------------------------------------- output


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, None an en dash."""

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(out: Path, data: dict, title: str, meta: dict, body: Sequence[str]) -> str:
    """Write ``out.json`` (``data``, indented) and ``out.md``: ``# title``, ``meta`` as a list, then the ``body``
    lines; returns the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    text = "\n".join([f"# {title}", "", *[f"- {k}: {v}" for k, v in meta.items()], "", *body]) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def header_md(title: str, header: dict) -> str:
    """The markdown preamble every result file starts with."""
    keys = ("device", "torch", "cuda", "triton", "transformers", "commit", "date")
    return f"# {title}\n\n" + "  \n".join(f"{k}: `{header.get(k)}`" for k in keys) + "\n"


def resolve_device(args, log: logging.Logger) -> torch.device:
    """``args.device`` or CUDA when available; without CUDA switch ``args.quick`` on (and say so)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        log.info("no CUDA device: running the quick mode")
        args.quick = True
    return device
