"""``moeq`` command line: quantize, calibrate, eval, info, verify, export, demo.

User mistakes (missing files, unsupported models, bad options, damaged checkpoints, a full disk) end with one
``moeq: error: ...`` line and exit status 2, never a traceback (``-v`` adds it); Ctrl-C exits 130 with one
line. Outputs are written as transactions (``moeq.io.atomic``): interrupted, they are left as they were.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import traceback
from pathlib import Path

import torch
from safetensors import SafetensorError

from moeq.cli_flags import add_quant_args, quant_config
from moeq.cli_checks import check_device, check_positive, check_quantize_args, check_token_ids, warn_binary_text, warn_positions
from moeq.config import QuantConfig, parse_dtype
from moeq.io.atomic import check_destination
from moeq.io.checkpoint import CheckpointError
from moeq.models import UnsupportedModelError

logger = logging.getLogger("moeq.cli")
USER_ERRORS = (CheckpointError, UnsupportedModelError, ValueError, OSError, SafetensorError)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeq", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="per-module log lines")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a local MoE checkpoint")
    q.add_argument("--model", required=True, help="local Hugging Face model directory")
    q.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing moeq checkpoint at --out")
    q.add_argument("--restart", action="store_true",
                   help="discard an unfinished run with other settings at --out (the same settings resume it)")
    q.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    q.add_argument("--device", default="cpu",
                   help="compute device; the model streams from disk one decoder layer at a time")
    q.add_argument("--calib-device", default=None, help="compute device for calibration (default: --device)")
    q.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="keep the calibration activations between layers in files under DIR instead of memory "
                        "(one sample in memory at a time; same results)")
    q.add_argument("--hessian-mib", type=int, default=None, metavar="MIB",
                   help="gptq/agq: collect the experts' Hessians in chunks of about MIB (default 128; a layer's "
                        "expert inputs are recorded once and replayed per chunk; same results)")
    add_quant_args(q)

    e = sub.add_parser("eval", help="perplexity, routing agreement and lm-eval tasks of a (quantized) checkpoint")
    e.add_argument("--model", required=True)
    e.add_argument("--ppl", metavar="FILE", help="text file (perplexity; also the tokens of --reference)")
    e.add_argument("--reference", metavar="FP_DIR", default=None,
                   help="full-precision model: per-layer top-k routing agreement on the --ppl windows")
    e.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    e.add_argument("--lm-eval-include", default=None, metavar="DIR", help="directory of local lm-eval task YAMLs")
    e.add_argument("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    e.add_argument("--device", default="cpu")

    i = sub.add_parser("info", help="size on disk, bits per weight, expert memory before/after")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="write a checkpoint for serving engines (compressed-tensors or gptq)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gptq"])
    x.add_argument("dir")
    x.add_argument("out")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT")

    v = sub.add_parser("verify", help="full content check: digests, every byte's SHA-256, scale/zero ranges")
    v.add_argument("dir")

    from moeq.calib.ebss import DEFAULT_TAU as EBSS_DEFAULT_TAU

    c = sub.add_parser("calibrate", help="generate calibration data with the model itself (EBSS)")
    c.add_argument("--model", required=True, help="local Hugging Face model directory")
    c.add_argument("--method", default="ebss", choices=["ebss"])
    c.add_argument("--out", required=True, metavar="FILE.jsonl", help="samples; the summary goes to FILE.summary.json")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--beam", type=int, default=4, help="beam width W")
    c.add_argument("--candidates", type=int, default=None,
                   help="next-token candidates per beam (default: 2x --beam; more = more balance per nat, slower)")
    c.add_argument("--tau", type=float, default=EBSS_DEFAULT_TAU,
                   help="balance temperature: score = mean log-prob - B/tau, B = each token's standardized gain "
                        "in the dataset's squared expert-usage cv (same scale at any expert count and top-k). "
                        f"Smaller = more balanced, less fluent. Default {EBSS_DEFAULT_TAU:g}, one value for all "
                        "models (benchmarks/results/ebss_sweep.md: usage CV <= 0.8x of unguided sampling at "
                        "E = 8-128). To pick: compare the summary's per-layer min tokens / few-token experts "
                        "with --compare-text; lower tau (e.g. halve it) while they improve and mean log-prob "
                        "stays near that of real text; raise it if samples are rejected as degenerate. "
                        "'inf' = no balance term")
    c.add_argument("--balance", default="marginal", choices=["marginal", "dataset", "sample"],
                   help="B: each token's gain against the dataset it joins (default), the cv of the dataset, or "
                        "the cv of each sample's own routing (MoEQuant; tau values differ between the three)")
    c.add_argument("--compare-text", metavar="FILE", default=None,
                   help="also report tokens per expert of plain-text calibration of the same size (random windows "
                        "of FILE) in the summary, next to the EBSS samples'")
    c.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the candidates")
    c.add_argument("--batch", type=int, default=8, help="samples searched at once")
    c.add_argument("--min-compression", type=float, default=0.2, help="reject samples whose zlib ratio is lower")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    c.add_argument("--device", default="cpu")

    d = sub.add_parser("demo", help="quantize a tiny model end to end and check it")
    d.add_argument("--out", default="moeq-demo")
    d.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an earlier demo run")
    d.add_argument("--device", default="cpu")
    return ap


def _require_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json (expected a Hugging Face model directory)")
    return p


def cmd_quantize(args) -> int:
    from transformers import AutoConfig

    from moeq.calib.data import is_jsonl, load_calibration
    from moeq.models import adapter_for
    from moeq.quantizers import get_method

    src = _require_dir(args.model)
    check_quantize_args(args)
    config = quant_config(args)
    hf_config = AutoConfig.from_pretrained(src)
    adapter_for(hf_config)  # fail before loading any weight
    check_destination(args.out, [src], args.overwrite)
    check_source(src)
    tok = _maybe_tokenizer(src)
    calib = None
    needs_calib = get_method(config.method).needs_calibration
    mixed_calib = args.mixed_budget is not None and args.mixed_score != "outlier"
    # smoothing always needs calibration text; 8-bit routers use it (KL-aligned clipping) when given
    if (needs_calib or config.smooth or mixed_calib or config.act_clip_search
            or (config.router_bits == 8 and args.calib)):
        if not args.calib:
            what = (f"--method {config.method}" if needs_calib else "--smooth" if config.smooth
                    else "--act-clip-search" if config.act_clip_search else f"--mixed-score {args.mixed_score}")
            raise ValueError(f"{what} needs --calib FILE (a text file)")
        if tok is None and not is_jsonl(args.calib):  # a .jsonl holds token ids already
            raise FileNotFoundError(f"no tokenizer in {src} to tokenize the calibration text")
        warn_binary_text(args.calib)
        warn_positions(args.seqlen, hf_config)
        calib = load_calibration(tok, args.calib, args.nsamples, args.seqlen, args.seed)
        check_token_ids(calib, hf_config.vocab_size, args.calib)
    if args.mixed_budget is None:
        from moeq.pipeline import quantize_checkpoint

        out, report = quantize_checkpoint(src, args.out, config, calib, dtype=parse_dtype(args.dtype),
                                          device=args.calib_device or args.device, tokenizer=tok,
                                          overwrite=args.overwrite, restart=args.restart,
                                          calib_source=str(args.calib) if calib is not None else None,
                                          offload_dir=args.offload_dir, hessian_mib=args.hessian_mib)
    else:
        out, report = _quantize_mixed(args, src, config, calib, tok)
    errs = [m.rel_error for m in report.modules]
    print(f"quantized {len(errs)} expert stacks with {config.method} w{config.bits}g{config.group_size}: "
          f"mean rel. weight error {sum(errs) / max(len(errs), 1):.4f}; saved to {out}")
    return 0


def _quantize_mixed(args, src: Path, config: QuantConfig, calib, tok):
    """Mixed precision allocates bits under a budget over every layer's scores, so it still loads the whole
    model (the streaming pipeline quantizes a plan it is given: ``QuantConfig.expert_bits``)."""
    import moeq
    from moeq.io.source import load_source_model
    from moeq.mixed import plan_mixed_precision
    from moeq.models import adapter_for

    logger.warning("--mixed-budget loads the whole model into memory (its bit allocation needs every layer's scores)")
    model = load_source_model(src, parse_dtype(args.dtype), args.device)
    plan = plan_mixed_precision(model, adapter_for(model), args.mixed_budget, args.mixed_score,
                                args.mixed_granularity, tuple(args.mixed_levels) if args.mixed_levels else None, calib)
    config = QuantConfig.from_dict({**config.to_dict(), "expert_bits": plan})
    report = moeq.quantize_model(model, config, calib=calib, device=args.calib_device)
    if calib is not None and "_samples" in model.config.quantization_config["calibration"]:
        model.config.quantization_config["calibration"]["_samples"]["source"] = str(args.calib)
    out = moeq.save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, sources=(src,))
    return out, report


def check_source(src: Path) -> None:
    """Refuse, before any weight is loaded, a source that is already quantized or lacks / mis-shapes a tensor
    its architecture declares (``moeq.io.source``: headers only)."""
    from moeq.io.source import open_source

    open_source(src)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _maybe_tokenizer(path):
    """The tokenizer saved in a local directory, or None when it has no tokenizer files (transformers would
    otherwise build an empty default tokenizer that turns any text into zero tokens)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        logger.info("no tokenizer files in %s", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        logger.info("no tokenizer saved with the checkpoint (%s)", exc)
        return None


def _load_any(path: Path, device: str):
    """A moeq checkpoint via load_quantized, or a full-precision checkpoint (validated, never random-filled)."""
    import moeq
    from moeq.io.source import load_source_model

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "moeq":
        return moeq.load_quantized(path, device=device)
    return load_source_model(path, device=device)


def cmd_eval(args) -> int:
    from moeq.calib.data import tokenize_file
    from moeq.eval.perplexity import perplexity

    if not args.ppl and not args.lm_eval:
        raise ValueError("eval needs --ppl FILE and/or --lm-eval TASKS")
    check_positive(args, ("seqlen", "max_windows"))
    check_device(args.device, "--device")
    if args.reference and not args.ppl:
        raise ValueError("--reference measures routing on the --ppl text; pass --ppl FILE")
    path = _require_dir(args.model)
    ref_path = _require_dir(args.reference) if args.reference else None
    tok = _maybe_tokenizer(args.tokenizer or path)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer in {args.tokenizer or path}; pass --tokenizer DIR")
    if args.lm_eval:
        from moeq.eval.lm_eval import _import_lm_eval

        try:
            _import_lm_eval()  # fail before loading any model
        except ImportError as exc:
            raise ValueError(str(exc)) from exc
    model = _load_any(path, args.device)
    if args.ppl:
        ids = tokenize_file(tok, args.ppl)
        res = perplexity(model, ids, args.seqlen, max_windows=args.max_windows)
        print(f"perplexity {res['ppl']:.4f} over {res['windows']} windows x {args.seqlen} tokens ({res['tokens']} predicted)")
        if ref_path is not None:
            from moeq.eval.routing import format_agreement, routing_agreement

            agree = routing_agreement(model, _load_any(ref_path, args.device), ids, args.seqlen, args.max_windows)
            print(f"routing agreement with {ref_path} (top-{model.config.num_experts_per_tok}, per MoE layer):")
            print("\n".join(format_agreement(agree)))
    if args.lm_eval:
        from moeq.eval.lm_eval import format_results, run_lm_eval

        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        limit = int(args.lm_eval_limit) if args.lm_eval_limit and args.lm_eval_limit >= 1 else args.lm_eval_limit
        print("\n".join(format_results(run_lm_eval(model, tok, tasks, limit=limit, include_path=args.lm_eval_include))))
    return 0


def cmd_calibrate(args) -> int:
    from transformers import AutoConfig

    from moeq.calib.ebss import EBSSConfig, ebss_generate, write_jsonl
    from moeq.io.source import load_source_model
    from moeq.models import adapter_for

    src = _require_dir(args.model)
    check_positive(args, ("nsamples", "seqlen", "beam", "candidates", "batch"))
    check_device(args.device, "--device")
    if Path(args.out).suffix.lower() != ".jsonl":
        raise ValueError(f"--out must be a .jsonl file, got {args.out}")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    cfg = EBSSConfig(nsamples=args.nsamples, seqlen=args.seqlen, beam=args.beam, candidates=args.candidates,
                     tau=args.tau, balance=args.balance, temperature=args.temperature, batch=args.batch,
                     seed=args.seed, min_compression=args.min_compression)
    cfg.validate()
    adapter_for(AutoConfig.from_pretrained(src))  # fail before loading any weight
    tok = _maybe_tokenizer(src)
    model = load_source_model(src, parse_dtype(args.dtype), args.device)
    if args.compare_text and tok is None:
        raise FileNotFoundError(f"no tokenizer in {src} to tokenize --compare-text {args.compare_text}")
    result = ebss_generate(model, tok, cfg)
    if not result.samples:
        raise ValueError(f"ebss: all {result.summary['generated']} samples were degenerate {result.summary['rejected']}")
    s = result.summary
    if args.compare_text:
        from moeq.calib.data import load_calibration
        from moeq.calib.expert_tokens import calibration_report

        text = load_calibration(tok, args.compare_text, s["accepted"], args.seqlen, args.seed)
        s["plain_text"] = {"source": str(args.compare_text), **calibration_report(model, text)}
    side = write_jsonl(result, args.out)
    print(f"ebss: {s['accepted']} samples x {args.seqlen} tokens -> {args.out} (summary {side}); generated "
          f"{s['generated']}, rejected {s['rejected_total']} as degenerate {s['rejected']}; dataset expert-usage "
          f"cv {s['dataset_cv']:.4f} (sigma {s['dataset_sigma']:.4f}), mean log-prob {s['mean_logprob']:.4f}")
    plain = {st["layer"]: st for st in s["plain_text"]["expert_tokens"]} if "plain_text" in s else {}
    if plain:
        print(f"plain text ({args.compare_text}, same size): expert-usage cv {s['plain_text']['cv']:.4f}")
    for st in s["expert_tokens"]:
        line = (f"  layer {st['layer']}: tokens per expert min {st['min']} / median {st['median']:g}, "
                f"{st['under_threshold']} of {st['experts']} experts under {st['threshold']:.1f}")
        if st["layer"] in plain:
            p = plain[st["layer"]]
            line += f" (plain text: min {p['min']} / median {p['median']:g}, {p['under_threshold']} under)"
        print(line)
    return 0


def cmd_info(args) -> int:
    from moeq.io.info import checkpoint_info

    info = checkpoint_info(args.dir)
    if args.json:
        d = dict(vars(info), bits_per_weight=info.bits_per_weight, expert_bytes_bf16=info.expert_bytes_bf16)
        print(json.dumps(d, indent=2))
    else:
        print("\n".join(info.lines()))
    return 0


def cmd_export(args) -> int:
    from moeq.io.export import export_checkpoint

    out = export_checkpoint(args.dir, args.out, args.format, overwrite=args.overwrite)
    print(f"exported {args.dir} as {args.format} to {out}")
    return 0


def cmd_verify(args) -> int:
    from moeq.io.verify import verify_checkpoint

    for line in verify_checkpoint(args.dir):
        print(line)
    return 0


def cmd_demo(args) -> int:
    from moeq.demo import run_demo

    check_device(args.device, "--device")
    for line in run_demo(args.out, args.device, overwrite=args.overwrite):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo, "calibrate": cmd_calibrate,
               "export": cmd_export, "verify": cmd_verify}[args.cmd]
    try:
        with torch.inference_mode():
            return handler(args)
    except KeyboardInterrupt:
        print("moeq: interrupted (an output being written was discarded; existing files are unchanged)"
              f"{_resume_note(args)}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"moeq: error: {describe_error(exc)}{_resume_note(args)}", file=sys.stderr)
        return 2


def _resume_note(args) -> str:
    """Where an interrupted ``moeq quantize`` keeps its finished layers (re-running the command resumes)."""
    from moeq.pipeline.partial import PROGRESS, partial_dir

    if args.cmd != "quantize":
        return ""
    d = partial_dir(Path(args.out).absolute())
    if not (d / PROGRESS).is_file():
        return ""
    done = len(json.loads((d / PROGRESS).read_text()).get("layers", {}))
    return f"; {done} finished layer(s) are kept in {d}: run the same command again to continue"


def describe_error(exc: BaseException) -> str:
    """One line for a user error; a full disk says so and that the output was left as it was."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}; the output was not written (existing files are unchanged)"
    if isinstance(exc, SafetensorError):
        return f"corrupt safetensors file ({exc})"
    return " ".join(str(exc).split("\n")) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
