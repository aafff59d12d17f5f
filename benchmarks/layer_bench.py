"""moeq's benchmark of record for one MoE experts layer: INT4 ``QuantizedExperts`` vs transformers' bf16 experts.

    python benchmarks/layer_bench.py                          # GPU: 4 anchor shapes x T in {1,16,128,2048}
    python benchmarks/layer_bench.py --shapes Mixtral-8x7B --tokens 1 16 --out /tmp/lb
    python benchmarks/layer_bench.py --quick                  # CPU smoke run (what CI runs), < 60 s

Per shape (``benchmarks/shapes.py``) and token count T, with random routing (softmax of Gaussian logits, top-k,
renormalized) and random bf16 activations, it times:

* ``bf16_grouped_mm`` / ``bf16_eager``: the family's transformers v5 experts module (``MixtralExperts``,
  ``Qwen3MoeExperts``, ...) built from a real config, random bf16 weights, with ``experts_implementation``
  ``"grouped_mm"`` (what a user gets today) and ``"eager"`` (the per-expert loop; not capturable, so timed
  without graphs and labelled so).
* ``moeq_<backend>``: ``QuantizedExperts`` INT4 g128 (random packed codes, scales ~ N(0,1)*0.01, built packed:
  no bf16 expert weight is ever materialized), for every backend ``backend_for`` accepts, with and without
  ``online_hadamard``. Each backend's output is first checked against the ``reference`` backend run on the same
  inputs upcast to float32 (``||out - ref|| / ||ref||`` under a dtype-scaled threshold; NaN fails).

Timing: median of CUDA-graph replays (``do_bench_cudagraph``) of a call that cycles over ``--sets`` (>= 3)
fresh input sets; non-capturable calls (eager loop, reference backend) with ``do_bench`` medians. Reported per
row: us, achieved GB/s (touched experts' bytes in the row's weight format / time), fraction of the floor,
speed-up vs bf16 grouped_mm, INT4 floor (touched experts' 4-bit weights + bf16 g128 scales / 3.0 TB/s, or the
compute floor 2*T*k*3*H*I / 738 TFLOP/s when larger), bf16 floor (touched bf16 bytes / 3.0 TB/s), and memory:
resident bytes of the experts module (allocator delta on CUDA; tensor bytes on CPU) and the peak during one call.
Quick mode (automatic on CPU): tiny shapes with the registry's structure, T in {1, 16}, the reference backend,
few iterations, one CPU thread; timings are labelled "CPU (not comparable)". With ``TRITON_INTERPRET=1`` the
Triton backend is checked too but not timed (about a minute per call on a 2-core CPU: use ``--shapes X
--tokens 1``).
Writes ``layer_bench.json``, ``layer_bench.md`` and one latency-vs-T PNG per shape (when matplotlib imports) to
``--out`` (default ``benchmarks/results/<gpu-name-or-cpu>/``). A failing case is logged, recorded and skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks import bench_common as bc  # noqa: E402
from benchmarks.shapes import ANCHOR_SHAPES, ModelShape, experts_bytes, get_shape  # noqa: E402
from moeq.config import WeightSpec  # noqa: E402
from moeq.io.info import tensor_bytes  # noqa: E402
from moeq.nn.experts import QuantizedExperts  # noqa: E402
from moeq_kernels import backends  # noqa: E402

logger = logging.getLogger("moeq.benchmarks.layer")

# Relative error allowed against the float32-activation reference (METHOD.md: bf16 operands land 1e-3..1e-2).
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
EXPERTS_CLASS = {"mixtral": "MixtralExperts", "qwen2_moe": "Qwen2MoeExperts", "qwen3_moe": "Qwen3MoeExperts",
                 "deepseek_v2": "DeepseekV2Experts", "olmoe": "OlmoeExperts"}
SPEC = WeightSpec(bits=4, group_size=128, sym=True)


def _tol(dtype: torch.dtype, backend: str, device: torch.device) -> float:
    # Triton's interpreter converts fp32 -> bf16 by truncation (a biased 2^-8 per rounding; see
    # tests/kernels/test_triton_fused_experts.py), so its bf16 results get the looser bound those tests use.
    if backend == "triton" and device.type != "cuda" and dtype == torch.bfloat16:
        return 5e-2
    return TOL[dtype]


GRAPH_BACKENDS = ("cuda", "triton")  # the reference backend syncs with the host (torch.unique): never captured


def build_bf16_experts(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The family's transformers experts module with random ``N(0, 0.02)`` weights in ``dtype`` on ``device``.

    Built on meta and given real tensors one parameter at a time, so only the ``dtype`` weights are allocated.
    Its ``config`` is kept on the module: ``config._experts_implementation`` picks grouped_mm / eager per call.
    """
    family = shape.experts_family
    mod_path = f"transformers.models.{family}.modeling_{family}"
    cls = getattr(importlib.import_module(mod_path), EXPERTS_CLASS[family])
    config = shape.experts_config()
    with torch.device("meta"):
        module = cls(config)
    for name, p in list(module.named_parameters()):
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        fresh = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02)
        setattr(owner, name.rpartition(".")[2], nn.Parameter(fresh, requires_grad=False))
    return module.eval()


def build_int4_experts(shape: ModelShape, device: torch.device) -> QuantizedExperts:
    """``QuantizedExperts`` INT4 g128 (symmetric, bf16 scales) with random packed contents, built packed."""
    e, h, i, _ = shape.ehik
    module = QuantizedExperts(e, h, i, SPEC, SPEC, torch.bfloat16, "silu", False, "auto", device=device)
    bc.fill_random_packed_(module)
    return module.eval()


def _resident(build, device: torch.device):
    """``(module, resident bytes)``: allocator delta on CUDA, the module's tensor bytes elsewhere."""
    if device.type != "cuda":
        module = build()
        return module, tensor_bytes(module)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    module = build()
    torch.cuda.synchronize()
    return module, torch.cuda.memory_allocated(device) - before


def _peak(call, device: torch.device) -> int | None:
    """Extra bytes allocated at the peak of one ``call()`` on CUDA (None on CPU: no peak allocator stats)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def _set_peak(row: dict, transient: int | None) -> None:
    """``transient_bytes`` (one call's extra allocations) and ``peak_bytes`` (resident + transient)."""
    row["transient_bytes"] = transient
    row["peak_bytes"] = None if transient is None else row["resident_bytes"] + transient


def op_attrs(module: QuantizedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor) -> dict:
    """The attributes ``moeq_kernels.ops.fused_experts`` hands to ``backend_for`` for a call naming a backend."""
    return module.weights().dispatch_attrs(hidden, top_k_index, explicit=True)


def accepted_backends(device, attrs: dict, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Backends (``backends.BACKENDS`` order) that accept the call, and why the others do not."""
    ok, why = [], {}
    for name in backends.BACKENDS:
        if name not in backends.registered("fused_experts") or (wanted and name not in wanted):
            continue
        try:
            backends.backend_for("fused_experts", device, requested=name, **attrs)
            ok.append(name)
        except RuntimeError as exc:
            why[name] = str(exc)
    return ok, why


def timed(fn, sets: list, device: torch.device, capturable: bool, quick: bool) -> tuple[float, str]:
    """``(median us per call, timing label)`` of ``fn(*inputs)`` cycling over ``sets``."""
    def run_all():
        for s in sets:
            fn(*s)

    run_all()  # warm-up: JIT compiles, autotuning, lazy imports stay out of the numbers and of graph capture
    if device.type != "cuda":  # the warm-up above is enough on a CPU; quick mode keeps iterations minimal
        return bc.time_cpu(run_all, iters=2 if quick else 10, warmup=0) / len(sets), "CPU (not comparable)"
    if capturable:
        try:
            return bc.time_graph(run_all) / len(sets), "cuda-graph"
        except RuntimeError as exc:  # a host sync inside: time it eagerly instead, and say so
            logger.warning("graph capture failed (%s); timing eagerly", str(exc).splitlines()[0])
            torch.cuda.synchronize()
            return bc.time_eager(run_all) / len(sets), "eager (capture failed)"
    return bc.time_eager(run_all) / len(sets), "eager (no graph)"


def _bench_dense(module: nn.Module, row_base: dict, sets: list, args, device, dtype, resident: int) -> list[dict]:
    """Rows of the transformers experts module: grouped_mm (graph-timed) and the eager loop (checked against it)."""
    label = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    rows, outs = [], {}
    for impl in ("grouped_mm", "eager"):
        row = {**row_base, "impl": f"{label}_{impl}", "backend": None, "online_hadamard": None,
               "resident_bytes": resident}
        try:
            module.config._experts_implementation = impl  # read by the experts forward at every call
            with torch.inference_mode():
                outs[impl] = module(*sets[0])
                _set_peak(row, _peak(lambda: module(*sets[0]), device))
                row["us"], row["timing"] = timed(module, sets, device, impl == "grouped_mm", args.quick)
            if impl == "eager" and "grouped_mm" in outs:  # the two transformers paths must agree (same weights)
                err = bc.rel_err(outs["eager"], outs["grouped_mm"])
                row.update(check="vs grouped_mm", check_rel_err=err, check_tol=TOL[dtype],
                           check_passed=err < TOL[dtype])
            row["gbps"] = row_base["touched"] * 3 * row_base["H"] * row_base["I"] * dtype.itemsize / row["us"] / 1e3
            row["frac_floor"] = max(row_base["bf16_floor_us"], row_base["compute_floor_us"]) / row["us"]
        except bc.CASE_ERRORS as exc:
            logger.error("%s T=%d %s failed: %s", row_base["shape"], row_base["T"], row["impl"], exc)
            row["error"] = str(exc)
        rows.append(row)
    return rows


def _bench_int4(module: QuantizedExperts, row_base: dict, sets: list, args, device, dtype, resident: int,
                grouped_us: float | None) -> tuple[list[dict], list[dict]]:
    """Rows of every accepted moeq backend, without and with online Hadamard; returns ``(rows, errors)``."""
    rows, errors = [], []
    name_t = f"{row_base['shape']} T={row_base['T']}"
    for hadamard in (False, True):
        module.online_hadamard = hadamard  # one packed copy per shape serves both variants
        ok, why = accepted_backends(device, op_attrs(module, sets[0][0], sets[0][1]), args.backends)
        for name, reason in why.items():
            logger.info("%s hadamard=%s: backend %s skipped: %s", name_t, hadamard, name, reason)
        try:
            module.backend = "reference"
            with torch.inference_mode():  # the oracle: same inputs, activations upcast to float32
                ref = module(sets[0][0].float(), sets[0][1], sets[0][2])
        except bc.CASE_ERRORS as exc:
            logger.error("%s: reference failed: %s", name_t, exc)
            errors.append({**row_base, "stage": "reference", "online_hadamard": hadamard, "error": str(exc)})
            continue
        for name in ok:
            row = {**row_base, "impl": f"moeq_{name}", "backend": name, "online_hadamard": hadamard,
                   "resident_bytes": resident}
            try:
                module.backend = name
                with torch.inference_mode():
                    err, tol = bc.rel_err(module(*sets[0]), ref), _tol(dtype, name, device)
                    row.update(check="vs reference (fp32 activations)", check_rel_err=err, check_tol=tol,
                               check_passed=err < tol)
                    if not row["check_passed"]:
                        logger.error("%s %s hadamard=%s: rel err %.3g > %.1g", name_t, name, hadamard, err, tol)
                    skip = None
                    if name != "reference" and device.type != "cuda":  # Triton's interpreter: ~1 min per call
                        skip = "not timed (interpreter)"
                    elif name == "reference" and row_base["T"] > args.reference_max_t:
                        skip = "not timed (reference, T > --reference-max-t)"  # a per-expert Python loop
                    if skip:
                        row["timing"] = skip
                        rows.append(row)
                        continue
                    _set_peak(row, _peak(lambda: module(*sets[0]), device))
                    row["us"], row["timing"] = timed(module, sets, device, name in GRAPH_BACKENDS, args.quick)
                row["gbps"] = row_base["touched"] * module.nbytes() / module.num_experts / row["us"] / 1e3
                row["frac_floor"] = row_base["int4_floor_us"] / row["us"]
                row["speedup_vs_grouped_mm"] = grouped_us / row["us"] if grouped_us else None
            except bc.CASE_ERRORS as exc:
                logger.error("%s %s hadamard=%s failed: %s", name_t, name, hadamard, exc)
                row["error"] = str(exc)
            rows.append(row)
    module.online_hadamard, module.backend = False, "auto"
    return rows, errors


def bench_shape(shape: ModelShape, tokens: list[int], args, device: torch.device, dtype: torch.dtype,
                rows: list, errors: list) -> None:
    """All rows of one shape: baselines and moeq backends at every T, with and without online Hadamard."""
    e, h, i, k = shape.ehik
    base = {"shape": shape.name, "E": e, "H": h, "I": i, "k": k, "dtype": str(dtype).replace("torch.", "")}
    dense = int4 = None
    try:
        dense, dense_resident = _resident(lambda: build_bf16_experts(shape, dtype, device), device)
    except bc.CASE_ERRORS as exc:
        logger.error("%s: building the dense experts failed: %s", shape.name, exc)
        errors.append({**base, "stage": "dense build", "error": str(exc)})
    try:
        int4, int4_resident = _resident(lambda: build_int4_experts(shape, device), device)
    except bc.CASE_ERRORS as exc:
        logger.error("%s: building the INT4 experts failed: %s", shape.name, exc)
        errors.append({**base, "stage": "int4 build", "error": str(exc)})
    int4_per_expert = int4.nbytes() / e if int4 is not None else experts_bytes(1, h, i)
    for t in tokens:
        sets = []  # fresh inputs per T; every timed call cycles over all of them
        for _ in range(args.sets):
            idx, w = bc.random_routing(t, e, k, dtype, device)
            sets.append((torch.randn(t, h, dtype=dtype, device=device), idx, w))
        touched = sum(len(torch.unique(s[1])) for s in sets) / len(sets)
        compute_us = 2 * t * k * 3 * h * i / bc.ANCHOR_FLOPS * 1e6
        row_base = {**base, "T": t, "touched": touched, "compute_floor_us": compute_us,
                    "int4_floor_us": max(touched * int4_per_expert / bc.ANCHOR_BW * 1e6, compute_us),
                    "bf16_floor_us": touched * 3 * h * i * 2 / bc.ANCHOR_BW * 1e6}
        grouped_us = None
        if dense is not None:
            dense_rows = _bench_dense(dense, row_base, sets, args, device, dtype, dense_resident)
            rows += dense_rows
            grouped_us = dense_rows[0].get("us")
        if int4 is not None:
            new_rows, new_errors = _bench_int4(int4, row_base, sets, args, device, dtype, int4_resident, grouped_us)
            rows += new_rows
            errors += new_errors
    del dense, int4
    if device.type == "cuda":
        torch.cuda.empty_cache()


COLUMNS = ("T", "touched", "impl", "had", "us", "timing", "GB/s", "floor frac", "vs grouped_mm", "INT4 floor us",
           "bf16 floor us", "check", "resident MiB", "peak MiB")


def _table_row(r: dict) -> list:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    check = None
    if r.get("check_passed") is not None:
        check = f"{'ok' if r['check_passed'] else 'FAIL'} {r['check_rel_err']:.1e}"
    us = r.get("us")
    return [r["T"], round(r["touched"], 1), r["impl"], {None: "", False: "", True: "H"}[r.get("online_hadamard")],
            us if us is not None or "error" not in r else f"error: {r['error'][:40]}", r.get("timing"), r.get("gbps"),
            r.get("frac_floor"), r.get("speedup_vs_grouped_mm"), r["int4_floor_us"], r["bf16_floor_us"], check,
            mib(r.get("resident_bytes")), mib(r.get("peak_bytes"))]


def write_results(out: Path, header: dict, rows: list, errors: list) -> str:
    """Write layer_bench.json / .md (+ PNG plots); return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_bench.json").write_text(json.dumps({"header": header, "rows": rows, "errors": errors}, indent=1))
    parts = [bc.header_md("moeq layer benchmark", header),
             f"Timing: {header['timing_note']}  \nFloors at {bc.ANCHOR_BW / 1e12:.1f} TB/s and "
             f"{bc.ANCHOR_FLOPS / 1e12:.0f} TFLOP/s (anchors); measured copy bandwidth here: "
             f"{header['copy_bw_measured'] / 1e9:.0f} GB/s. `H` = online Hadamard. Peak = resident + one call's "
             "transient allocations (CUDA only).\n"]
    for name in dict.fromkeys(r["shape"] for r in rows):
        srows = [r for r in rows if r["shape"] == name]
        e, h, i, k = (srows[0][c] for c in ("E", "H", "I", "k"))
        table = bc.md_table(COLUMNS, [_table_row(r) for r in srows])
        parts.append(f"## {name} (E={e}, H={h}, I={i}, k={k})\n\n{table}")
    if errors:
        parts.append("## Errors\n\n" + "\n".join(f"- {e['shape']} {e['stage']}: {e['error']}" for e in errors))
    md = "\n\n".join(parts) + "\n"
    (out / "layer_bench.md").write_text(md)
    _plot(out, rows, header)
    return md


def summary(rows: list, header: dict) -> str:
    """The short table printed last: per (shape, T) the baselines, the fastest moeq row without / with Hadamard."""
    out = []
    for key in dict.fromkeys((r["shape"], r["T"]) for r in rows):
        sel = [r for r in rows if (r["shape"], r["T"]) == key]
        us = lambda impl: next((r.get("us") for r in sel if r["impl"].endswith(impl)), None)  # noqa: E731
        best = {}
        for had in (False, True):
            timed_rows = [r for r in sel if r["online_hadamard"] is had and r.get("us") and r["backend"] != "reference"]
            timed_rows = timed_rows or [r for r in sel if r["online_hadamard"] is had and r.get("us")]
            best[had] = min(timed_rows, key=lambda r: r["us"], default=None)
        fails = sum(1 for r in sel if r.get("check_passed") is False or r.get("error"))
        b = best[False]
        out.append([key[0], key[1], round(sel[0]["touched"], 1), sel[0]["int4_floor_us"], us("_grouped_mm"),
                    us("_eager"), b and b["us"], b and b["backend"], best[True] and best[True]["us"],
                    b and b.get("speedup_vs_grouped_mm"), b and b.get("frac_floor"), fails or "ok"])
    cols = ("shape", "T", "touched", "INT4 floor", "grouped_mm", "eager", "moeq", "backend", "moeq +H",
            "x grouped_mm", "floor frac", "checks")
    return f"layer_bench on {header['device']} (us; {header['timing_note'][:60]}...)\n" + bc.md_table(cols, out)


def _plot(out: Path, rows: list, header: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no latency plots")
        return
    for name in dict.fromkeys(r["shape"] for r in rows):
        srows = [r for r in rows if r["shape"] == name and r.get("us")]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in dict.fromkeys((r["impl"], r["online_hadamard"]) for r in srows):
            pts = sorted((r["T"], r["us"]) for r in srows if (r["impl"], r["online_hadamard"]) == label)
            ax.plot(*zip(*pts), marker="o", label=label[0] + (" +H" if label[1] else ""))
        for key, style in (("int4_floor_us", "k--"), ("bf16_floor_us", "k:")):
            pts = sorted(dict((r["T"], r[key]) for r in srows).items())
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_us", ""))
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="us (median)",
               title=f"{name} on {header['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"layer_bench_{name}.png", dpi=110)
        plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, T in {1,16}, few iterations (automatic on CPU)")
    p.add_argument("--shapes", nargs="+", default=None, help=f"registry names (default: {' '.join(ANCHOR_SHAPES)})")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="token counts (default 1 16 128 2048)")
    p.add_argument("--backends", nargs="+", default=None, choices=backends.BACKENDS, help="moeq backends to try")
    p.add_argument("--sets", type=int, default=None, help="fresh input sets cycled per timed call (>= 3; default 4, "
                   "3 in quick mode)")
    p.add_argument("--reference-max-t", type=int, default=None,
                   help="time the reference backend only up to this T (it still checks every T); default 16 on GPU")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>/)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns the JSON payload written to ``--out``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = bc.resolve_device(args, logger)
    args.sets = max(args.sets or (3 if args.quick else 4), 3)
    if args.reference_max_t is None:
        args.reference_max_t = 1 << 30 if args.quick else 16
    dtype = getattr(torch, args.dtype)
    names = args.shapes or list(ANCHOR_SHAPES)
    shapes = [get_shape(n).scaled() if args.quick else get_shape(n) for n in names]
    tokens = args.tokens or ([1, 16] if args.quick else [1, 16, 128, 2048])
    torch.manual_seed(args.seed)
    header = {**bc.env_header(device), "quick": args.quick, "sets": args.sets, "spec": "int4 g128 sym bf16 scales",
              "copy_bw_measured": bc.measure_copy_bandwidth(device), "floor_bw": bc.ANCHOR_BW,
              "floor_flops": bc.ANCHOR_FLOPS, "backends_registered": backends.describe(),
              "timing_note": ("CPU (not comparable): host-clock medians" if device.type != "cuda" else
                              "median of CUDA-graph replays (do_bench_cudagraph) cycling over fresh input sets; "
                              "rows timed 'eager' use do_bench medians without graphs")}
    rows, errors = [], []
    out = args.out or bc.default_out_dir(device)
    with bc.cpu_threads(1 if args.quick and device.type == "cpu" else None):
        for shape in shapes:
            logger.info("shape %s (E=%d H=%d I=%d k=%d), T=%s", shape.name, *shape.ehik, tokens)
            bench_shape(shape, tokens, args, device, dtype, rows, errors)
            write_results(out, header, rows, errors)  # after every shape: a run cut short keeps its results
    logger.info("wrote %s", out)
    print(summary(rows, header))
    return {"header": header, "rows": rows, "errors": errors}


if __name__ == "__main__":
    payload = main()
    failed = [r for r in payload["rows"] if r.get("error") or r.get("check_passed") is False]
    sys.exit(1 if failed or payload["errors"] else 0)
