"""Checks of command-line input that run before any model is loaded, so a mistake costs seconds, not the
minutes of loading a checkpoint. Each raises ``ValueError`` (one ``moeq: error:`` line) naming the option."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("moeq.cli")


def check_device(name: str | None, option: str) -> None:
    """``name`` parses as a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{option} {name!r} is not a device (expected cpu, cuda or cuda:N)") from exc
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"{option} {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"{option} {name!r}: no CUDA device is available on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_positive(args, names: tuple[str, ...]) -> None:
    """Integer options that must be >= 1 (``--nsamples``, ``--seqlen``, ...)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_quantize_args(args) -> None:
    check_positive(args, ("nsamples", "seqlen", "expert_token_budget", "hessian_mib"))
    if args.hessian_mib is not None and args.mixed_budget is not None:
        raise ValueError("--hessian-mib applies to the streaming pipeline; --mixed-budget runs the whole-model "
                         "path, which holds every layer's Hessians at once")
    check_device(args.device, "--device")
    check_device(args.calib_device, "--calib-device")
    check_act_args(args)
    if not 0 < args.damp:
        raise ValueError(f"--damp must be > 0, got {args.damp}")
    if args.mixed_budget is not None and args.mixed_levels is not None:
        lo, hi = sorted(args.mixed_levels)
        if not lo <= args.mixed_budget <= hi:
            raise ValueError(f"--mixed-budget {args.mixed_budget} must lie between the --mixed-levels {lo} and {hi}")
    if args.calib:
        p = Path(args.calib)
        if not p.is_file():
            raise FileNotFoundError(f"--calib {p}: no such file")
        if p.stat().st_size == 0:
            raise ValueError(f"--calib {p} is empty")


def check_act_args(args) -> None:
    """Activation-quantization options that contradict each other, named by option."""
    if args.act_bits is None:
        for opt, bad in (("--act-format", args.act_format != "int"), ("--act-linears", bool(args.act_linears)),
                         ("--act-clip-search", args.act_clip_search), ("--act-hessian", args.act_hessian != "fp"),
                         ("--act-clip", args.act_clip != 1.0)):
            if bad:
                raise ValueError(f"{opt} needs --act-bits 8 or 4")
        return
    if args.act_format == "fp8_e4m3" and args.act_bits != 8:
        raise ValueError(f"--act-format fp8_e4m3 is an 8-bit format; got --act-bits {args.act_bits}")
    if not 0.0 < args.act_clip <= 1.0:
        raise ValueError(f"--act-clip must be in (0, 1], got {args.act_clip}")
    missing = sorted(set(args.act_linears) - set(args.quantize_linears))
    if missing:
        raise ValueError(f"--act-linears {' '.join(missing)}: only quantized linears get activation quantization; "
                         "add them to --quantize-linears")


def warn_positions(seqlen: int, config) -> None:
    """A ``--seqlen`` beyond the model's positions calibrates on states the model never produces."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        logger.warning("--seqlen %d is above the model's max_position_embeddings %d: calibration windows beyond "
                       "the trained positions give activations the model never sees in use", seqlen, limit)


def warn_binary_text(path: str) -> None:
    """Calibration text that is not UTF-8 text (NUL bytes, undecodable) is almost always the wrong file."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        return
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    binary = b"\0" in head
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        binary = binary or exc.start < len(head) - 4  # a multi-byte character cut at the read boundary is fine
    if binary:
        logger.warning("--calib %s does not look like text (NUL bytes or invalid UTF-8 in its first 64 KiB); "
                       "calibrating on it will not represent real inputs", p)


def check_token_ids(calib, vocab_size: int, source: str) -> None:
    """Every calibration token id lies in ``[0, vocab_size)`` (ids from a .jsonl are not checked elsewhere;
    an id past the embedding table would crash mid-run or read another row)."""
    ids = calib["input_ids"] if isinstance(calib, dict) else calib
    if ids.numel() == 0:
        raise ValueError(f"--calib {source}: no calibration tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        row = int(((ids == bad).any(-1)).nonzero()[0])
        raise ValueError(f"--calib {source}: token id {bad} (sample {row}) is outside the model's vocabulary "
                         f"[0, {vocab_size})")
