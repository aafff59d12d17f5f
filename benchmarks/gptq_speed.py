"""moeq GPTQ vs GPTQModel side by side on CPU: wall time and perplexity, same checkpoint, same settings.

    python benchmarks/gptq_speed.py [--nsamples 128 --seqlen 256] [--venv /tmp/gptqm-venv]

Models: the shipped demo model and a generated ~15M-parameter 16-expert Qwen2-MoE checkpoint (random weights,
written to a temporary directory, never committed). Settings for both tools: GPTQ W3 and W4, group 128,
symmetric, no act-order, routed experts only (GPTQModel skips attention and shared experts through its
``dynamic`` rules), ``nsamples x seqlen`` calibration windows of ``stdlib_text("train")``, the same perplexity
function (non-overlapping ``seqlen`` windows of ``stdlib_text("heldout")``) on the quantized model. Differences
that remain: moeq runs its per-group MSE clip search (``w_clip``), GPTQModel its default (``mse=0``).

GPTQModel runs in its own venv (``pip install gptqmodel`` there; never a dependency of moeq), as a subprocess
of this script (``--worker``), so its import and model-load time are part of its wall time as moeq's are.
GPTQModel's perplexity is that of its saved checkpoint loaded back with ``GPTQModel.load`` (its inference
flow); the in-memory model right after ``quantize()`` is measured too and reported when it differs: it keeps
~400-800 tensors on the meta device (lm_head among them), so its logits are garbage (NaN, or a mean NLL too
large for exp: the OverflowError of an earlier version of this script).
Thread count: set ``OMP_NUM_THREADS`` for both tools at once (the worker inherits the environment). On a
shared 2-core machine, 2 threads can make moeq many times slower (barriers of many small OpenMP regions).
Also times RTN of one Qwen3-30B-A3B-shaped experts layer (128 experts, H=2048, I=768), default settings
(clip search on) and without the clip search. Writes ``benchmarks/results/gptq_speed.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GPTQMODEL_CPU_WORKERS")
SKIP_NON_EXPERTS = {r"-:.*self_attn.*": {}, r"-:.*shared_expert.*": {}}


def perplexity(model, ids: torch.Tensor, seqlen: int) -> dict:
    """exp(mean next-token NLL) over non-overlapping ``seqlen`` windows of ``ids [N]`` int64 (GPTQ convention).

    Returns ``{"ppl", "nonfinite_windows"}``: ``ppl`` is ``inf`` when the mean NLL is too large for exp (a
    broken model) and ``nan`` when some window's logits are not finite (counted in ``nonfinite_windows``).
    """
    nll, count, bad = 0.0, 0, 0
    with torch.no_grad():
        for i in range(ids.numel() // seqlen):
            x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=x).logits.float()
            bad += int(not torch.isfinite(logits).all())
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
            count += seqlen - 1
    mean = nll / count
    if math.isnan(mean):
        ppl = float("nan")
    else:
        ppl = math.exp(mean) if mean < math.log(sys.float_info.max) else float("inf")
    return {"ppl": ppl, "nonfinite_windows": bad}


def worker(args_path: str) -> None:
    """GPTQModel side (runs inside its venv): quantize, time, perplexity; prints one JSON line."""
    t0 = time.perf_counter()
    from gptqmodel import GPTQModel, QuantizeConfig

    a = json.loads(Path(args_path).read_text())
    data = torch.load(a["data"])
    cfg = QuantizeConfig(bits=a["bits"], group_size=128, sym=True, desc_act=False, dynamic=SKIP_NON_EXPERTS)
    model = GPTQModel.load(_with_pad_token(a["model"], a["tmp"]), cfg, device="cpu")
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in data["calib"]]
    model.quantize(calib, batch_size=1)
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "dtype": str(next(model.model.parameters()).dtype),
           "meta_tensors_after_quantize": sum(t.is_meta for t in model.model.state_dict().values())}
    # Perplexity of the saved checkpoint, loaded back for inference (GPTQModel's documented flow). The
    # in-memory model after quantize() is also measured: its skipped modules may not hold real weights.
    inmem = perplexity(model.model, data["held"], a["seqlen"])
    res["in_memory"] = inmem
    if inmem["nonfinite_windows"]:
        res["in_memory"]["first_nonfinite"] = first_nonfinite_module(model.model, data["held"][: a["seqlen"]])
    qdir = Path(a["tmp"]) / f"gptqmodel_{Path(a['model']).name}_{a['bits']}"
    model.save(str(qdir))
    del model
    loaded = GPTQModel.load(str(qdir), device="cpu")
    res.update(perplexity(loaded.model, data["held"], a["seqlen"]))
    print(json.dumps(res), flush=True)


def first_nonfinite_module(model, x: torch.Tensor) -> dict | None:
    """The first module, in execution order, whose output on ``x [T]`` holds a non-finite value: its name,
    class, and (for a quantized linear) whether its own parameters/buffers are finite and its input was."""
    found = []

    def hook(name):
        def fn(mod, args, out):
            o = out[0] if isinstance(out, tuple) else out
            if not found and torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all():
                inp = args[0] if args and torch.is_tensor(args[0]) else None
                bufs = {k: "meta" if v.is_meta else bool(torch.isfinite(v.float()).all()) for k, v in
                        list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                        if v.is_floating_point()}
                found.append({"module": name, "class": type(mod).__name__, "finite_tensors": bufs,
                              "input_finite": None if inp is None else bool(torch.isfinite(inp).all()),
                              "input_absmax": None if inp is None else float(inp.float().abs().amax())})
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    with torch.no_grad():
        model(input_ids=x.unsqueeze(0))
    for h in handles:
        h.remove()
    return found[0] if found else None


def _with_pad_token(model_dir: str, tmp: str) -> str:
    """A copy of ``model_dir`` whose tokenizer names a pad token (GPTQModel refuses a tokenizer without one;
    the byte tokenizer has none). Id 0 is never a calibration target here: masks are all ones."""
    import shutil

    from transformers import AutoTokenizer

    dst = Path(tmp) / ("padded_" + Path(model_dir).name)
    if not dst.exists():
        shutil.copytree(model_dir, dst)
        tok = AutoTokenizer.from_pretrained(dst)
        tok.pad_token = tok.convert_ids_to_tokens(0)
        tok.save_pretrained(dst)
    return str(dst)


def generated_model(path: Path) -> None:
    """Save a random ~15M-parameter 16-expert Qwen2-MoE (byte tokenizer) to ``path``."""
    from moeq.testing import tiny_model, tiny_tokenizer

    m = tiny_model("qwen2_moe", hidden_size=256, num_hidden_layers=4, num_experts=16, moe_intermediate_size=256,
                   shared_expert_intermediate_size=512, intermediate_size=512, num_attention_heads=8,
                   num_key_value_heads=4)
    m.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def run_moeq(model_dir: Path, bits: int, data: dict, seqlen: int) -> dict:
    import moeq
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    moeq.quantize_model(model, moeq.QuantConfig(method="gptq", bits=bits, group_size=128), calib=data["calib"])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **perplexity(model, data["held"], seqlen)}


def run_fp(model_dir: Path, data: dict, seqlen: int) -> dict:
    """The unquantized float32 model's perplexity (the reference both tools' numbers are read against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, data["held"], seqlen)


def run_gptqmodel(venv: Path, model_dir: Path, bits: int, data_path: Path, seqlen: int, tmp: Path) -> dict:
    args = tmp / f"args_{model_dir.name}_{bits}.json"
    args.write_text(json.dumps({"model": str(model_dir), "bits": bits, "data": str(data_path), "seqlen": seqlen,
                                "tmp": str(tmp)}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}  # its default of 1 on 2 cores refuses its own 2-worker loader
    proc = subprocess.run([str(venv / "bin" / "python"), __file__, "--worker", str(args)], capture_output=True,
                          text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-5:]}
    return json.loads(lines[-1])


def rtn_layer_seconds(experts: int = 128, hidden: int = 2048, inter: int = 768) -> dict:
    """Wall time of moeq's RTN W4 g128 on one Qwen3-30B-A3B-shaped experts module (``experts`` x
    ``[2 * inter, hidden]`` gate_up + ``experts`` x ``[hidden, inter]`` down, random weights), with the
    default settings (MSE clip search on) and without the clip search."""
    from moeq.config import QuantConfig
    from moeq.methods import quantize_experts_rtn
    from moeq.quantizers.report import QuantReport

    class Experts(torch.nn.Module):
        def __init__(self, e: int):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.gate_up_proj = torch.nn.Parameter(torch.randn(e, 2 * inter, hidden, generator=g) * 0.02)
            self.down_proj = torch.nn.Parameter(torch.randn(e, hidden, inter, generator=g) * 0.02)

    out = {}
    mod = Experts(experts)
    for w_clip in (True, False):
        t0 = time.perf_counter()
        quantize_experts_rtn("layer", mod, QuantConfig(method="rtn", bits=4, group_size=128, w_clip=w_clip),
                             QuantReport())
        out[f"{experts} experts, w_clip={w_clip}" + (" (default)" if w_clip else "")] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--held-bytes", type=int, default=32768)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/gptqm-venv"))
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--models", nargs="+", default=["demo", "generated16"])
    ap.add_argument("--skip-rtn", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gptq_speed")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from moeq.assets import demo_model_path
    from moeq.calib.data import random_windows
    from moeq.calib.stdlib import stdlib_text

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_path())  # byte-level; the generated model saves the same one
    tok_ids = lambda text: torch.tensor(tok(text)["input_ids"], dtype=torch.long)  # noqa: E731
    data = {"calib": random_windows(tok_ids(stdlib_text("train", max_bytes=400_000)), a.nsamples, a.seqlen, seed=0),
            "held": tok_ids(stdlib_text("heldout", max_bytes=a.held_bytes))}
    rows, load_start = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        torch.save(data, tmp / "data.pt")
        dirs = {"demo": demo_model_path(), "generated16": tmp / "generated16"}
        if "generated16" in a.models:
            generated_model(dirs["generated16"])
        for name in a.models:
            fp = run_fp(dirs[name], data, a.seqlen)
            print(json.dumps({"model": name, "fp": fp}), flush=True)
            for bits in a.bits:
                row = {"model": name, "bits": bits, "fp_ppl": fp["ppl"],
                       "moeq": run_moeq(dirs[name], bits, data, a.seqlen),
                       "gptqmodel": run_gptqmodel(a.venv, dirs[name], bits, tmp / "data.pt", a.seqlen, tmp)}
                row["load"] = os.getloadavg()
                print(json.dumps(row), flush=True)
                rows.append(row)
    rtn = None if a.skip_rtn else rtn_layer_seconds()
    write_results(a, rows, rtn, load_start)


def write_results(a, rows: list, rtn: dict | None, load_start: tuple) -> None:
    import transformers

    gv = subprocess.run([str(a.venv / "bin" / "python"), "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                        capture_output=True, text=True).stdout.strip().splitlines()  # it prints a banner first
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            "load average (1/5/15 min) at start, at end": f"{_load(load_start)}; {_load(os.getloadavg())}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gptqmodel": gv[-1] if gv else "not installed",
            "environment": " ".join(f"{k}={os.environ[k]}" for k in _THREAD_ENV if k in os.environ) or "-",
            "commit": commit + (" (+ working tree)" if dirty else ""), "command": " ".join(sys.argv)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "rtn_layer_s": rtn}, indent=1) + "\n")
    lines = [f"# moeq GPTQ vs GPTQModel (CPU, W* g128 sym, routed experts, {a.nsamples} x {a.seqlen} tokens)", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "",
             "| model | bits | fp32 ppl | moeq wall s | moeq ppl | GPTQModel wall s | GPTQModel ppl "
             "| moeq / GPTQModel time | load avg after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, g = r["moeq"], r["gptqmodel"]
        if "error" in g:
            gcell, ratio = f"error: {' / '.join(g['error'])[-300:]} | -", "-"
        else:
            gcell, ratio = f"{g['wall_s']:.1f} | {_ppl(g)}", f"{m['wall_s'] / g['wall_s']:.2f}x"
        lines.append(f"| {r['model']} | {r['bits']} | {r['fp_ppl']:.4f} | {m['wall_s']:.1f} | {m['ppl']:.4f} | {gcell} "
                     f"| {ratio} | {_load(r['load'])} |")
    if rtn:
        lines += ["", "RTN W4 g128 of one Qwen3-30B-A3B-shaped experts layer (128 x [1536, 2048] + 128 x [2048, 768]):",
                  *[f"- {k}: {v:.1f} s" for k, v in rtn.items()]]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _ppl(g: dict) -> str:
    """GPTQModel's reloaded-checkpoint ppl, and the in-memory model's where it differs (non-finite windows)."""
    out = f"{g['ppl']:.4f}" + (f" ({g['nonfinite_windows']} non-finite windows)" if g["nonfinite_windows"] else "")
    mem = g.get("in_memory")
    if mem and (mem["nonfinite_windows"] or not math.isfinite(mem["ppl"])):
        first = mem.get("first_nonfinite")
        where = f", first at {first['module']} ({first['class']})" if first else ""
        out += f"; in memory after quantize(): {mem['ppl']:.4f}, {mem['nonfinite_windows']} non-finite windows{where}"
    return out


def _load(avg: tuple) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
