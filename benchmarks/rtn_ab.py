"""RTN of one Qwen3-30B-A3B-shaped layer side by side for two or more checkouts of moeq, alternating (A B A B
...) so that a noisy machine's drift falls on every checkout alike.

Each round runs every checkout in a fresh child process (its own ``moeq`` import from that directory) that
quantizes the layer of ``benchmarks/rtn_speed.py`` ``--repeats`` times with the default settings (W4 g128,
MSE clip search) and prints its times and a digest of the packed tensors; the digests must agree.

    git worktree add /tmp/before <commit>
    OMP_WAIT_POLICY=PASSIVE python benchmarks/rtn_ab.py /tmp/before . --rounds 2 --repeats 3 \\
        --out benchmarks/results/rtn_ab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import env_header, git_commit, md_table, write_result  # noqa: E402

# the child: one checkout's layer timings and digest, as one JSON line
_CHILD = r"""
import hashlib, json, sys, time
root = sys.argv[1]
sys.path[:0] = [root, root + "/benchmarks"]
import torch
import moeq
assert moeq.__file__.startswith(root), moeq.__file__
import rtn_speed
torch.set_num_threads(int(sys.argv[3]))
mod = rtn_speed.Experts(128)
rtn_speed.quantize(rtn_speed.Experts(1, seed=1), True)  # build / load the C library outside the timings
times = []
for _ in range(int(sys.argv[2])):
    t, out = rtn_speed.quantize(mod, True)
    times.append(t)
h = hashlib.sha256()
for k, v in sorted(rtn_speed.packed_state(out).items()):
    h.update(k.encode())
    h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"times": times, "digest": h.hexdigest()[:12]}))
"""


def run_one(root: Path, repeats: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(repeats), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{root}: the layer run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", type=Path, nargs="+", help="checkouts of moeq (e.g. git worktrees)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="layers per child process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rtn_ab"))
    a = ap.parse_args()
    roots = [r.resolve() for r in a.roots]
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {str(r): [] for r in roots}
    digests: dict[str, set[str]] = {str(r): set() for r in roots}
    for _ in range(a.rounds):
        for r in roots:
            res = run_one(r, a.repeats, a.threads)
            times[str(r)] += res["times"]
            digests[str(r)].add(res["digest"])
            print(r, " ".join(f"{t:.2f}" for t in res["times"]), res["digest"], flush=True)
    same = len(set().union(*digests.values())) == 1
    rows = []
    for r in roots:
        t = sorted(times[str(r)])
        rows.append([str(r), git_commit(r), a.threads, len(t), t[0], t[len(t) // 2], t[-1]])
    meta = {**env_header(torch.device("cpu")), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "command": " ".join(sys.argv)}
    result = {"meta": meta, "times_s": times, "identical_bits": same,
              "digests": {k: sorted(v) for k, v in digests.items()}}
    print(write_result(a.out, result, "RTN of one Qwen3-30B-A3B-shaped layer, checkouts side by side (W4 g128, MSE "
                       "clip search)", meta,
                       [md_table(["checkout", "commit", "threads", "runs", "min s", "median s", "max s"], rows), "",
                        f"Same packed tensors in every run: {same}"]), end="")
    if not same:
        raise SystemExit("the checkouts gave different packed tensors")


if __name__ == "__main__":
    main()
