"""End-to-end ``model.generate`` benchmark of real-size MoE configs with random packed INT4 experts.

    python benchmarks/model_bench.py                 # GPU: Qwen3-30B-A3B (default + static/compile), Mixtral-8x7B
    python benchmarks/model_bench.py --models Qwen3-30B-A3B --modes static_compile --num-layers 12
    python benchmarks/model_bench.py --quick         # CPU smoke run (what CI runs): tiny config, a few tokens

Each model is built by ``benchmarks/random_model.py`` from its real transformers config (``benchmarks/shapes.py``):
parameters on meta, ``QuantizedExperts`` INT4 g128 filled with random codes in packed form, every other weight
random on the device; nothing dense is ever allocated for the experts. Modes:

* ``default``: dynamic cache, eager forward (what ``generate`` does out of the box);
* ``static_compile``: ``cache_implementation="static"``; on CUDA transformers (5.17 and 5.23) then compiles the
  forward itself (``get_compiled_call``: ``torch.compile`` with ``CompileConfig``, default
  ``mode="reduce-overhead"``, i.e. CUDA graphs). The first call compiles and is reported apart (``first_call_s``).
  On CPU transformers does not compile, and the row says so.

Per (model, mode, batch): tokens/s (batch * new tokens / generate wall time), decode tokens/s (from per-step
timestamps), prefill + first token latency, peak GPU memory (``max_memory_allocated``) and, from a
``torch.profiler`` run, the experts' share of device time (``moeq::fused_experts`` over all kernels; not
attributable under CUDA-graph replay, so None for compiled rows). Before timing, the first MoE layer's experts
are checked against the reference backend (float32 activations); in quick mode the whole model's logits are also
checked against a dense twin holding the dequantized expert weights. Targets (ANCHORS.md): Qwen3-30B-A3B
>= 150 tok/s at batch 1 in <= 20 GB; Mixtral-8x7B loads and generates in <= 30 GB. A 48-layer compile takes
minutes: ``--num-layers`` cuts depth for a quicker look (rows record how many layers ran; targets are then not
judged). Writes ``model_bench.json`` / ``model_bench.md`` to ``--out`` (default
``benchmarks/results/<gpu-name-or-cpu>/``). A failing case is logged, recorded and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks import bench_common as bc  # noqa: E402
from benchmarks.random_model import dense_experts_bytes, quantized_experts_bytes, random_quantized_model  # noqa: E402
from benchmarks.shapes import get_shape  # noqa: E402
from moeq.config import WeightSpec  # noqa: E402
from moeq.io.info import tensor_bytes  # noqa: E402
from moeq.io.load import params_on_meta  # noqa: E402
from moeq.nn.experts import QuantizedExperts  # noqa: E402
from moeq_kernels import backends  # noqa: E402

logger = logging.getLogger("moeq.benchmarks.model")

MODES = ("default", "static_compile")
DEFAULT_PLAN = (("Qwen3-30B-A3B", MODES), ("Mixtral-8x7B", ("default",)))
TARGETS = {"Qwen3-30B-A3B": {"batch": 1, "min_tok_s": 150.0, "max_peak_gb": 20.0},
           "Mixtral-8x7B": {"batch": None, "min_tok_s": None, "max_peak_gb": 30.0}}
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
SPEC = WeightSpec(4, 128, True)


class StepTimer:
    """A stopping criterion that never stops and records the host time of every decoding step."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_experts(model: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int = 16) -> dict:
    """The first MoE layer's experts (its configured backend) vs the reference backend on float32 activations."""
    q = next(m for m in model.modules() if isinstance(m, QuantizedExperts))
    k = model.config.num_experts_per_tok
    x = torch.randn(tokens, q.hidden_dim, dtype=dtype, device=device)
    idx, w = bc.random_routing(tokens, q.num_experts, k, dtype, device)
    g13, g2 = q.group_size("w13"), q.group_size("w2")
    attrs = {"w13_bits": 4, "w2_bits": 4, "w13_group_size": g13, "w2_group_size": g2, "hidden_dim": q.hidden_dim,
             "intermediate_dim": q.intermediate_dim, "num_tokens": tokens, "zeros": False,
             "online_hadamard": q.online_hadamard, "dtype": dtype}
    backend = backends.backend_for("fused_experts", device, q.backend, **attrs)
    with torch.inference_mode():
        out = q(x, idx, w)
        ref = torch.ops.moeq.fused_experts(x.float(), idx, w, q.w13_qweight, q.w13_scales, q.w13_qzeros,
                                           q.w2_qweight, q.w2_scales, q.w2_qzeros, 4, g13, 4, g2, "silu",
                                           q.online_hadamard, "reference")
    err = bc.rel_err(out, ref)
    return {"what": "layer experts vs reference", "backend": backend, "rel_err": err, "tol": TOL[dtype],
            "passed": err < TOL[dtype]}


def check_logits_vs_dense(model: nn.Module, config, dtype: torch.dtype, device: torch.device) -> dict:
    """Logits of ``model`` vs a dense twin whose experts hold the dequantized weights (small models only)."""
    with params_on_meta():
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    src = dict(model.named_parameters())
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    for name, p in list(dense.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = dense.get_submodule(owner_name)
        if owner_name in quant:
            gate_up, down = quant[owner_name].dequantized(dtype)
            t = gate_up if attr == "gate_up_proj" else down
        else:
            t = src[name].detach()
        owner._parameters[attr] = nn.Parameter(t.clone(), requires_grad=False)
    dense.to(device).eval()
    ids = torch.randint(3, config.vocab_size, (2, 12), device=device)
    with torch.inference_mode():
        got, want = model(ids).logits, dense(ids).logits
    err = bc.rel_err(got, want)
    return {"what": "model logits vs dense dequantized twin", "rel_err": err, "tol": TOL[dtype],
            "passed": err < TOL[dtype]}


def experts_share(model: nn.Module, gen_kwargs: dict, device: torch.device) -> float | None:
    """Share of the experts op in one ``generate`` call: device time on CUDA, host time of the op on CPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        model.generate(**gen_kwargs)
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    ops = [e for e in events if e.key == "moeq::fused_experts"]
    if not ops:
        return None
    if device.type == "cuda":
        dev = lambda e, a: getattr(e, a, None) or getattr(e, a.replace("device", "cuda"), 0.0)  # noqa: E731
        experts = sum(dev(e, "device_time_total") for e in ops)
        total = sum(dev(e, "self_device_time_total") for e in events)
        return experts / total if total and experts else None
    return min(1.0, sum(e.cpu_time_total for e in ops) / wall_us)


def bench_generate(model, name: str, mode: str, batch: int, args, device: torch.device) -> dict:
    """One row: warm-up (compiles in static_compile mode), timed repeats, profiler share."""
    from transformers import CompileConfig

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, args.prompt_len), device=device)
    gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
               do_sample=False)
    if mode == "static_compile":
        gen.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=args.fullgraph))
    row = {"model": name, "mode": mode, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**gen)
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t0
        row["compiled"] = hasattr(model, "_compiled_call") and mode == "static_compile"
        if mode == "static_compile" and not row["compiled"]:
            row["note"] = f"static cache, not compiled (transformers compiles on CUDA only; device={device.type})"
        if out.shape[1] != args.prompt_len + args.new_tokens:
            row["note"] = f"generated {out.shape[1] - args.prompt_len} tokens, not {args.new_tokens}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        walls, decode, prefill = [], [], []
        for _ in range(args.repeats):
            timer = StepTimer()
            _sync(device)
            t0 = time.perf_counter()
            model.generate(**gen, stopping_criteria=[timer])
            _sync(device)
            walls.append(time.perf_counter() - t0)
            prefill.append(timer.stamps[0] - t0)
            if len(timer.stamps) > 1:
                decode.append(batch * (len(timer.stamps) - 1) / (timer.stamps[-1] - timer.stamps[0]))
        wall = statistics.median(walls)
        row.update(tok_s=batch * args.new_tokens / wall, generate_s=wall, prefill_ms=statistics.median(prefill) * 1e3,
                   decode_tok_s=statistics.median(decode) if decode else None)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        share_kwargs = {**gen, "max_new_tokens": min(args.new_tokens, args.profile_tokens)}
        if mode == "static_compile":
            share_kwargs["max_new_tokens"] = args.new_tokens  # another length would resize the static cache
        row["experts_share"] = None if row["compiled"] else experts_share(model, share_kwargs, device)
    return row


def judge(row: dict, full_depth: bool, device: torch.device) -> None:
    """Record whether the row meets its ANCHORS target (only for full-depth models on a GPU)."""
    tgt = TARGETS.get(row["model"])
    if tgt is None or not full_depth or device.type != "cuda" or (tgt["batch"] and tgt["batch"] != row["batch"]):
        return
    peak = max(row["peak_bytes"] or 0, row.get("build_peak_bytes") or 0)  # "loads and generates in"
    ok = row["peak_bytes"] is not None and peak <= tgt["max_peak_gb"] * 1e9
    if tgt["min_tok_s"]:
        ok = ok and row["tok_s"] >= tgt["min_tok_s"]
    speed = f">= {tgt['min_tok_s']:.0f} tok/s, " if tgt["min_tok_s"] else ""
    row["target"] = f"{speed}<= {tgt['max_peak_gb']:.0f} GB (peak of load and generate)"
    row["target_met"] = bool(ok)


def bench_model(name: str, modes, args, device: torch.device, dtype: torch.dtype, rows: list, models: list,
                flush=lambda: None) -> None:
    """Build one model, check it, run every (mode, batch); ``flush()`` after each row writes what is known."""
    shape = get_shape(name)
    shape = shape.scaled() if args.quick else shape
    name = shape.name  # "-tiny" in quick mode: the rows must not read as the real model
    config = shape.config(num_layers=args.num_layers)
    info = {"model": name, "layers": config.num_hidden_layers, "full_layers": shape.num_layers}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model = random_quantized_model(config, SPEC, device, dtype, backend=args.backend, seed=args.seed)
        model.generation_config.eos_token_id = None  # random weights: never stop early
        model.generation_config.pad_token_id = 0
        info.update(build_s=time.perf_counter() - t0, resident_bytes=tensor_bytes(model),
                    experts_int4_bytes=quantized_experts_bytes(model), experts_bf16_bytes=dense_experts_bytes(model))
        if device.type == "cuda":
            info["build_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            info["resident_bytes_allocator"] = torch.cuda.memory_allocated(device)
        info["checks"] = [check_experts(model, dtype, device)]
        if args.quick:
            info["checks"].append(check_logits_vs_dense(model, config, dtype, device))
    except bc.CASE_ERRORS as exc:
        logger.error("%s: building / checking failed: %s", name, exc)
        models.append({**info, "error": str(exc)})
        flush()
        return
    models.append(info)
    for mode in modes:
        for batch in args.batch:
            logger.info("%s: %s, batch %d", name, mode, batch)
            try:
                row = bench_generate(model, name, mode, batch, args, device)
                row.update(layers=config.num_hidden_layers, build_peak_bytes=info.get("build_peak_bytes"))
                judge(row, config.num_hidden_layers == shape.num_layers and not args.quick, device)
            except bc.CASE_ERRORS as exc:
                logger.error("%s %s batch %d failed: %s", name, mode, batch, exc)
                row = {"model": name, "mode": mode, "batch": batch, "error": str(exc)}
            rows.append(row)
            flush()  # a run cut short (timeouts, a hung compile) keeps its rows
    del model
    gc.collect()
    torch._dynamo.reset()  # drop compiled graphs (and their CUDA-graph pools) before the next model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_results(out: Path, header: dict, models: list, rows: list) -> str:
    """Write model_bench.json / .md; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_bench.json").write_text(json.dumps({"header": header, "models": models, "rows": rows}, indent=1))
    gb = lambda b: None if b is None else b / 1e9  # noqa: E731
    mtab = bc.md_table(
        ("model", "layers", "build s", "resident GB", "experts INT4 GB", "experts bf16 GB", "checks"),
        [[m["model"], f"{m['layers']}/{m['full_layers']}", m.get("build_s"), gb(m.get("resident_bytes")),
          gb(m.get("experts_int4_bytes")), gb(m.get("experts_bf16_bytes")),
          m.get("error") or "; ".join(f"{c['what']}: {'ok' if c['passed'] else 'FAIL'} {c['rel_err']:.1e}"
                                      for c in m.get("checks", []))] for m in models])
    rtab = bc.md_table(
        ("model", "mode", "batch", "tok/s", "decode tok/s", "prefill ms", "first call s", "peak GB", "experts share",
         "target", "note"),
        [[r["model"], r["mode"], r["batch"], r.get("tok_s"), r.get("decode_tok_s"), r.get("prefill_ms"),
          r.get("first_call_s"), gb(r.get("peak_bytes")), r.get("experts_share"),
          (f"{r['target']}: {'met' if r['target_met'] else 'MISSED'}" if "target" in r else None),
          r.get("error") or r.get("note")] for r in rows])
    md = (bc.header_md("moeq model benchmark (generate, random INT4 g128 experts)", header) +
          f"\nprompt {header['prompt_len']} tokens, {header['new_tokens']} new tokens, greedy; "
          f"tok/s = batch x new tokens / generate wall time (median of {header['repeats']}).\n\n"
          f"## Models\n\n{mtab}\n\n## generate\n\n{rtab}\n")
    (out / "model_bench.md").write_text(md)
    return md


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on CPU, a few tokens (automatic on CPU)")
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: Qwen3-30B-A3B, Mixtral-8x7B)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES)
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 16)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls per row (median)")
    p.add_argument("--profile-tokens", type=int, default=8, help="new tokens of the profiled call")
    p.add_argument("--num-layers", type=int, default=None, help="cut every model to this many layers")
    p.add_argument("--fullgraph", action="store_true", help="CompileConfig(fullgraph=True)")
    p.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS)
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on GPU, float32 in quick mode")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns the JSON payload written to ``--out``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = bc.resolve_device(args, logger)
    q = args.quick
    args.batch = args.batch or ([1, 2] if q else [1, 16])
    args.prompt_len = args.prompt_len or (8 if q else 32)
    args.new_tokens = args.new_tokens or (4 if q else 64)
    args.repeats = args.repeats or (1 if q else 2)
    dtype = getattr(torch, args.dtype or ("float32" if q else "bfloat16"))
    plan = ([(m, tuple(args.modes or MODES)) for m in args.models] if args.models else
            [(m, tuple(args.modes) if args.modes else modes) for m, modes in DEFAULT_PLAN])
    if q and not args.models:
        plan = [("Qwen3-30B-A3B", tuple(args.modes or MODES))]
    torch.manual_seed(args.seed)
    header = {**bc.env_header(device), "quick": q, "dtype": str(dtype).replace("torch.", ""), "spec": str(SPEC),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "backends_registered": backends.describe(), "num_layers_override": args.num_layers}
    rows, models = [], []
    out = args.out or bc.default_out_dir(device)
    with bc.cpu_threads(1 if q and device.type == "cpu" else None):
        for name, modes in plan:
            bench_model(name, modes, args, device, dtype, rows, models, lambda: write_results(out, header, models, rows))
    md = write_results(out, header, models, rows)
    print(md)
    return {"header": header, "models": models, "rows": rows}


if __name__ == "__main__":
    payload = main()
    bad = [r for r in payload["rows"] if r.get("error")] + [m for m in payload["models"] if m.get("error")]
    bad += [c for m in payload["models"] for c in m.get("checks", []) if not c["passed"]]
    sys.exit(1 if bad else 0)
