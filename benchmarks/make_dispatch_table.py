"""Generate ``moeq_kernels/configs/dispatch.json`` (the measured backend table of ``auto``) from committed results.

    python benchmarks/make_dispatch_table.py            # rewrite the packaged table
    python benchmarks/make_dispatch_table.py --check    # exit 1 if the packaged table is not what the results give

Sources (one results folder per GPU, :data:`RESULT_DIRS`), read in this order:

* ``layer_bench_run*.json``, the harness of record: every ``moeq_<backend>`` row whose output check passed
  (INT4 g128 ``QuantizedExperts`` per backend, with and without online Hadamard);
* ``cuda_check.json`` (``benchmarks/gpu_cuda_check.py``): CUDA decode kernel vs Triton at T = 1 and 16;
* ``triton_kernels_check.json`` (``benchmarks/gpu_kernels_check.py``): Triton alone, with the kernel path its
  config ran (``slot`` / ``grouped``); the path of every Triton row comes from here.

A point is (GPU family, shape, T, online Hadamard). Its row names the fastest backend and that backend's path
(``decode`` for the CUDA kernel); ``us`` holds the times of the first source that timed the most backends
there. Every source that timed two or more backends at a point must name the same winner, or generation
fails: the table cannot silently side with one of two contradicting measurements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.shapes import get_shape  # noqa: E402
from moeq_kernels.dispatch import TABLE_PATH, TABLE_VERSION  # noqa: E402

RESULT_DIRS = ("benchmarks/results/h100-2026-11-23",)
# GPU name (as torch reports it) -> family (sm<major><minor>); the result files do not record the capability.
GPU_FAMILIES = {"H100": "sm90", "H200": "sm90", "H800": "sm90", "A100": "sm80", "L40S": "sm89"}
CUDA_PATH = "decode"


def gpu_family(name: str) -> str:
    for key, fam in GPU_FAMILIES.items():
        if key in name:
            return fam
    raise ValueError(f"GPU {name!r} has no family in GPU_FAMILIES; add its sm<major><minor>")


def _point(family: str, shape: str, t: int, had: bool) -> tuple:
    return family, shape, int(t), bool(had)


def _layer_bench(path: Path) -> tuple[dict, dict]:
    """``{point: {backend: us}}`` of one layer_bench JSON, and its header."""
    data = json.loads(path.read_text())
    fam = gpu_family(data["header"]["device"])
    out: dict = {}
    for r in data["rows"]:
        if not r["impl"].startswith("moeq_") or r.get("us") is None or r.get("check_passed") is False:
            continue
        out.setdefault(_point(fam, r["shape"], r["T"], r["online_hadamard"]), {})[r["backend"]] = r["us"]
    return out, data["header"]


def _cuda_check(path: Path) -> tuple[dict, dict]:
    data = json.loads(path.read_text())
    fam = gpu_family(data["env"]["gpu"])
    out: dict = {}
    for r in data["bench"]:
        for had, suffix in ((False, ""), (True, "_had")):
            times = {b: r[f"{b}_us{suffix}"] for b in ("cuda", "triton") if r.get(f"{b}_us{suffix}") is not None}
            if times:
                out[_point(fam, r["model"], r["T"], had)] = times
    return out, data["env"]


def _triton_check(path: Path) -> tuple[dict, dict, dict]:
    """Times, header, and ``{(family, shape, T): path}`` of the Triton configs that ran."""
    data = json.loads(path.read_text())
    fam = gpu_family(data["env"]["gpu"])
    out, paths = {}, {}
    for r in data["bench"]:
        paths[(fam, r["model"], int(r["T"]))] = r["config"]["path"]
        for had, key in ((False, "moeq_us"), (True, "moeq_had_us")):
            if r.get(key) is not None:
                out[_point(fam, r["model"], r["T"], had)] = {"triton": r[key]}
    return out, data["env"], paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def collect(result_dirs=RESULT_DIRS, repo: Path = REPO) -> tuple[list[tuple[str, dict]], dict, list[dict]]:
    """Measurements per source (``[(source, {point: {backend: us}})]`` in reading order), Triton paths, and
    one provenance entry per source file."""
    sources, paths, files = [], {}, []
    for d in result_dirs:
        folder = repo / d
        for f in sorted(folder.glob("layer_bench_run*.json")):
            times, header = _layer_bench(f)
            sources.append((f"{d}/{f.name}", times))
            files.append({"file": f"{d}/{f.name}", "sha256": _sha(f), "gpu": header["device"],
                          "date": header["date"], "torch": header["torch"], "triton": header["triton"],
                          "spec": header.get("spec")})
        for name, reader in (("cuda_check.json", _cuda_check), ("triton_kernels_check.json", _triton_check)):
            f = folder / name
            if not f.exists():
                continue
            res = reader(f)
            sources.append((f"{d}/{name}", res[0]))
            if len(res) == 3:
                paths.update(res[2])
            files.append({"file": f"{d}/{name}", "sha256": _sha(f), "gpu": res[1]["gpu"], "date": res[1]["date"],
                          "torch": res[1]["torch"], "triton": res[1]["triton"]})
    return sources, paths, files


def winners(sources: list[tuple[str, dict]]) -> dict:
    """``{point: (backend, us, source)}``; ValueError when two sources comparing backends disagree."""
    best: dict = {}
    for source, times in sources:
        for point, us in times.items():
            win = min(us, key=us.get)
            prev = best.get(point)
            if prev is not None and len(prev[1]) > 1 and len(us) > 1 and prev[0] != win:
                raise ValueError(f"{point}: {prev[2]} measured {prev[0]} fastest ({prev[1]}), {source} measured "
                                 f"{win} ({us}); resolve the contradiction before generating the table")
            if prev is None or len(us) > len(prev[1]):
                best[point] = (win, us, source)
    return best


def build_table(result_dirs=RESULT_DIRS, repo: Path = REPO) -> dict:
    """The table document (``moeq_kernels.dispatch`` schema) from the results in ``result_dirs``."""
    sources, paths, files = collect(result_dirs, repo)
    rows = []
    for (fam, shape, t, had), (backend, us, source) in sorted(winners(sources).items()):
        s = get_shape(shape)
        if backend == "cuda":
            path = CUDA_PATH
        elif backend == "triton":
            if (fam, shape, t) not in paths:
                raise ValueError(f"{shape} T={t}: Triton fastest but no triton_kernels_check row records its path")
            path = paths[(fam, shape, t)]
        else:
            path = backend
        rows.append({"family": fam, "shape": shape, "num_experts": s.num_experts, "hidden_dim": s.hidden,
                     "intermediate_dim": s.intermediate, "top_k": s.top_k, "num_tokens": t, "online_hadamard": had,
                     "backend": backend, "path": path, "us": {b: round(v, 1) for b, v in sorted(us.items())},
                     "source": source})
    provenance = {"generator": "benchmarks/make_dispatch_table.py", "families": sorted({r["family"] for r in rows}),
                  "gpus": sorted({f["gpu"] for f in files}), "dates": sorted({f["date"][:10] for f in files}),
                  "sources": files}
    return {"version": TABLE_VERSION, "op": "fused_experts", "provenance": provenance, "rows": rows}


def render(table: dict) -> str:
    return json.dumps(table, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TABLE_PATH)
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    text = render(build_table())
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs from the committed results; regenerate it'}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}: {text.count(chr(10) + '  {')} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
