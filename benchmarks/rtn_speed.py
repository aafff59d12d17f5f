"""RTN wall time of one Qwen3-30B-A3B-shaped experts layer on the CPU (issue #20's target: <= 10 s here).

One layer: 128 experts, gate_up ``[1536, 2048]`` and down ``[2048, 768]``, random bf16 weights (std 0.02, as a
hub checkpoint stores them), W4 g128 symmetric, bf16 scales, ``quantize_experts_rtn`` as ``moeq quantize``
calls it (error report included). Settings: the default MSE clip search (grid 100, max shrink 0.8, norm
2.4: 80 ratios per group) and without it; the C screening (``clip_native``: the CPU's kernel set, its power
estimates only, and the smaller sets it can run, AVX2 and portable, codes included) and the torch screening
it replaced (``MOEQ_NATIVE_CLIP=0``; timed on 8 experts, scaled to 128: a full layer takes minutes). Each
setting runs ``--repeats`` times per thread count; the table gives min and median. It also checks that both
screenings give the same packed tensors (bits) and records the screening's per-group counts.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/rtn_speed.py --out benchmarks/results/rtn_speed
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import env_header, md_table, write_result  # noqa: E402

from moeq.config import QuantConfig  # noqa: E402
from moeq.methods import quantize_experts_rtn  # noqa: E402
from moeq.quantizers import clip_native  # noqa: E402
from moeq.quantizers.report import QuantReport  # noqa: E402
from moeq.quantizers.rtn import clip_ratios  # noqa: E402

HIDDEN, INTER = 2048, 768


class Experts(torch.nn.Module):
    """A fused experts module of Qwen3-30B-A3B's shapes with random bf16 weights."""

    def __init__(self, e: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(
            (torch.randn(e, 2 * INTER, HIDDEN, generator=g) * 0.02).to(torch.bfloat16))
        self.down_proj = torch.nn.Parameter((torch.randn(e, HIDDEN, INTER, generator=g) * 0.02).to(torch.bfloat16))


def set_screening(native: bool) -> None:
    """Switch between the C and the torch screening (clip_native.load reads MOEQ_NATIVE_CLIP once)."""
    os.environ["MOEQ_NATIVE_CLIP"] = "1" if native else "0"
    clip_native.load.cache_clear()
    if native and clip_native.load() is None:
        raise SystemExit("the C screening library could not be built here (see the log)")


def quantize(mod: Experts, w_clip: bool) -> tuple[float, object]:
    """Seconds of one RTN of ``mod`` and the quantized module."""
    cfg = QuantConfig(method="rtn", bits=4, group_size=128, w_clip=w_clip)
    t0 = time.perf_counter()
    out = quantize_experts_rtn("layer", mod, cfg, QuantReport())
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def kernel_set_forced(kernels: str, estimates: str = "auto"):
    """Within the block the C screening runs ``kernels`` and ``estimates`` (clip_native.screen_candidates'
    arguments) and the C codes ``kernels``."""
    orig, orig_codes = clip_native.screen_candidates, clip_native.rtn_codes
    clip_native.screen_candidates = functools.partial(orig, kernels=kernels, estimates=estimates)
    clip_native.rtn_codes = functools.partial(orig_codes, kernels=kernels)
    try:
        yield
    finally:
        clip_native.screen_candidates, clip_native.rtn_codes = orig, orig_codes


def packed_state(mod) -> dict:
    return {k: v.clone() for k, v in mod.state_dict().items()}


def screening_counts(mod: Experts) -> dict:
    """Per-group counts of the C screening on the first 1024 rows of expert 0's gate_up."""
    w = mod.gate_up_proj[0, :1024].float().reshape(-1, 128)
    out = clip_native.screen_candidates(w, clip_ratios(100, 0.8), 4, True, torch.bfloat16, 2.4, 1e-30)
    n = w.shape[0]
    return {"groups": n, "ratios": 80, "with_moments": out["moments"] / n, "estimated": out["estimated"] / n,
            "vectors_estimated": out["vectors"] / n, "candidates": float(out["cand"].sum()) / n,
            "decided_in_C": float((out["best"] >= 0).sum()) / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-experts", type=int, default=8, help="experts timed with the torch screening")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rtn_speed"))
    a = ap.parse_args()
    load_start = os.getloadavg()
    full, small = Experts(128), Experts(a.torch_experts)
    rows, raw = [], {}
    set_screening(True)
    quantize(Experts(1, seed=1), True)  # build / load the library outside the timings
    kset = clip_native.kernel_set()  # read while the library is on (the torch rows turn it off)
    for threads in a.threads:
        torch.set_num_threads(threads)
        settings = [(f"C screening ({kset})", True, full, True, "best", "auto")]
        if kset == "avx512":  # its estimates are the power only; what a CPU with AVX2 and not AVX-512 runs instead
            settings.append(("C screening (avx2 kernels)", True, full, True, "avx2", "auto"))
        else:
            settings.append((f"C screening ({kset}, power estimates only)", True, full, True, "best", "power"))
        if kset != "portable":  # what a CPU without AVX2/AVX-512 (or not x86) runs
            settings.append(("C screening (portable kernels)", True, full, True, "portable", "auto"))
        settings += [("no clip search", True, full, False, "best", "auto"),
                     ("torch screening", False, small, True, "best", "auto")]
        for label, native, mod, w_clip, kernels, estimates in settings:
            set_screening(native)
            with kernel_set_forced(kernels, estimates):
                times = [quantize(mod, w_clip)[0] for _ in range(a.repeats)]
            scale = 128 / mod.gate_up_proj.shape[0]
            raw[f"{label}, {threads} threads"] = times
            rows.append([label + ("" if scale == 1 else f" ({mod.gate_up_proj.shape[0]} experts x {scale:.0f})"),
                         threads, min(times) * scale, statistics.median(times) * scale])
    torch.set_num_threads(a.threads[-1])
    set_screening(True)
    native_out = packed_state(quantize(small, True)[1])
    set_screening(False)
    torch_out = packed_state(quantize(small, True)[1])
    identical = native_out.keys() == torch_out.keys() and all(torch.equal(native_out[k], torch_out[k])
                                                              for k in native_out)
    set_screening(True)
    meta = {**env_header(torch.device("cpu")), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "screening_kernels": kset,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(), "command": " ".join(sys.argv), "repeats": a.repeats}
    counts = screening_counts(full)
    data = {"meta": meta, "rows": rows, "raw_s": raw, "identical_bits": identical, "screening": counts}
    title = "RTN of one Qwen3-30B-A3B-shaped experts layer (CPU, W4 g128 sym, bf16 weights and scales)"
    print(write_result(a.out, data, title, meta, [
        md_table(["setting", "threads", "min s per layer", "median s per layer"], rows), "",
        (f"C and torch screening give identical packed tensors ({a.torch_experts} experts, default clip "
         f"search): {identical}"), "",
        "C screening per group (expert 0, gate_up rows 0-1023): " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in counts.items())]), end="")
    if not identical:
        raise SystemExit("the C and torch screenings gave different packed tensors")


if __name__ == "__main__":
    main()
