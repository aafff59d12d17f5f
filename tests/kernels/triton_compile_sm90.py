"""Compile every Triton kernel launch of moeq's MoE and Hadamard paths for sm_90, on a machine without a GPU.

Why: the Triton interpreter (how the CPU tests run the kernels) executes the kernels as Python, so code that
the compiler rejects can pass there (e.g. statements after a ``return`` in a constexpr branch are still
compiled, and their shapes must be valid). This script runs the real launchers on CPU tensors with
``JITFunction.run`` replaced by a recorder that compiles each launch's exact specialization (argument dtypes,
constexprs, ``num_warps`` / ``num_stages``) for ``GPUTarget("cuda", 90, 32)`` and launches nothing.

Run by ``tests/kernels/test_triton_compile.py`` in a subprocess without ``TRITON_INTERPRET`` (kernels must
be ``JITFunction`` objects, not interpreted ones). Prints one line per distinct compile with ptxas's static
resource use when Triton's bundled ``cuobjdump`` is present (registers per thread, stack bytes per thread:
a non-zero stack is register spilling), and last ``compiled N kernels, M failed``; exit status 1 if any
failed. ``--markdown PATH`` also writes the launches and their resource use as a table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
            torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.int8: "i8",
            torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
SEEN: dict = {}
FAILED: list = []
ROWS: list = []  # (kernel, constexprs, options, regs, stack)


def _resources(cubin: bytes) -> tuple[int, int] | None:
    """(registers, stack bytes) per thread of a cubin from ``cuobjdump -res-usage``; None if unavailable."""
    if not CUOBJDUMP.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TL_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _compile_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stand-in for ``JITFunction.run``: compile this launch for sm_90, launch nothing."""
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip(self.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for i, param in enumerate(self.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[param.name] = _arg_type(value)
    key = (self.fn.__qualname__, tuple(signature.items()), tuple(sorted(constexprs.items())),
           tuple(sorted(options.items())))
    if key in SEEN:
        return None
    kernel = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
    cx = " ".join(f"{self.params[i[0]].name}={v}" for i, v in constexprs.items())
    name = f"{kernel} {cx} {options}"
    try:
        compiled = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=TARGET,
                                  options=options)
        SEEN[key] = "ok"
        res = _resources(compiled.asm["cubin"])
        ROWS.append((kernel, cx, options, *(res or (None, None))))
        print("ok     ", name, "" if res is None else f"regs={res[0]} stack={res[1]}", flush=True)
    except Exception as exc:  # noqa: BLE001 - any compiler error is a finding; report it and go on
        SEEN[key] = "FAILED"
        FAILED.append(name)
        print("FAILED ", name, "\n", "".join(traceback.format_exception(exc))[-3000:], flush=True)
    return None


def _stack(e, n, k, bits, group, dtype, asym):
    g = k if group == -1 else group
    qweight = torch.zeros(e, n, k * bits // 32, dtype=torch.int32)
    scales = torch.ones(e, n, k // g, dtype=dtype)
    zeros = torch.zeros(e, n, k // g, dtype=torch.uint8) if asym else None
    return [qweight, scales, zeros]


def _experts_case(e, h, i, k, t, dtype=torch.bfloat16, bits=4, group=128, asym=False, hadamard=False,
                  config=None, act=None):
    """One fused_experts_triton call; ``act``: None (W4A16) or the W4A8 format of both inputs (int / fp8_e4m3)."""
    from moeq_kernels.experts import ExpertWeights
    from moeq_kernels.triton.moe_gemm import fused_experts_triton

    x = torch.zeros(t, h, dtype=dtype)
    idx = torch.stack([torch.arange(k) for _ in range(t)])
    w = torch.ones(t, k)
    acts = {} if act is None else dict(act13_bits=8, act13_format=act, act2_bits=8, act2_format=act)
    weights = ExpertWeights.from_op_args(*_stack(e, 2 * i, h, bits, group, dtype, asym),
                                         *_stack(e, h, i, bits, group, dtype, asym), bits, group, bits, group,
                                         "silu", hadamard, **acts)
    fused_experts_triton(x, idx, w, weights, config=config)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled", file=sys.stderr)
        return 2
    JITFunction.run = _compile_launch
    from dataclasses import replace

    from moeq_kernels.triton.configs import select_config, w4a8_default_config
    from moeq_kernels.triton.hadamard import hadamard_triton

    shapes = {"Mixtral-8x7B": (8, 4096, 14336, 2), "Qwen3-30B-A3B": (128, 2048, 768, 8),
              "DeepSeek-V2-Lite": (64, 2048, 1408, 6), "OLMoE-1B-7B": (64, 2048, 1024, 8)}
    for (e, h, i, k) in shapes.values():
        for t in (1, 16, 2048):  # the default configs of the decode and prefill buckets
            _experts_case(e, h, i, k, t, hadamard=True)
            cfg = select_config(e, h, i, k, t)
            if cfg.path == "slot":
                _experts_case(e, h, i, k, t, hadamard=True, config=replace(cfg, hadamard="fused"))
    # Format variants on one shape: fp16 + asymmetric zeros, 8-bit, group 32 and per-channel, split-K.
    e, h, i, k = shapes["OLMoE-1B-7B"]
    for kw in (dict(dtype=torch.float16, asym=True), dict(bits=8), dict(group=32), dict(group=-1)):
        for t in (1, 256):
            _experts_case(e, h, i, k, t, hadamard=t == 1, **kw)
    cfg = select_config(e, h, i, k, 256)
    _experts_case(e, h, i, k, 256, config=replace(cfg, down=replace(cfg.down, split_k=2)))
    # W4A8 (both formats; e4m3 dots need sm_89+): the prefill bucket of the four shapes with the Hadamard, the
    # decode bucket (grouped tiles swapped in) and without it; format variants on OLMoE.
    for act in ("int", "fp8_e4m3"):
        for name, (e, h, i, k) in shapes.items():
            _experts_case(e, h, i, k, 2048, hadamard=True, act=act)
            if name in ("Mixtral-8x7B", "Qwen3-30B-A3B"):
                _experts_case(e, h, i, k, 1, act=act)
        e, h, i, k = shapes["OLMoE-1B-7B"]
        for kw in (dict(dtype=torch.float16, asym=True), dict(group=32), dict(group=-1)):
            _experts_case(e, h, i, k, 256, act=act, **kw)
        cfg = w4a8_default_config(e, h, i, k, 256)
        _experts_case(e, h, i, k, 256, act=act, config=replace(cfg, down=replace(cfg.down, split_k=2)))
    for n in (768, 1408, 1024, 14336, 4096):  # the standalone Hadamard op
        for dtype in (torch.bfloat16, torch.float32):
            hadamard_triton(torch.zeros(64, n, dtype=dtype), 1.0)
    if "--markdown" in sys.argv:
        _write_markdown(Path(sys.argv[sys.argv.index("--markdown") + 1]))
    print(f"compiled {len(SEEN)} kernels, {len(FAILED)} failed")
    return 1 if FAILED else 0


def _write_markdown(path: Path) -> None:
    import datetime

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    lines = [f"# Triton launches compiled for sm_90 (triton {triton.__version__}, torch {torch.__version__}, "
             f"commit {commit}, {datetime.date.today()})", "",
             "Static resource use from ptxas (`cuobjdump -res-usage`): registers and stack bytes per thread; a",
             "non-zero stack is register spilling. Produced by `tests/kernels/triton_compile_sm90.py --markdown`.", "",
             "| kernel | constexprs | launch | regs | stack |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {cx} | {' '.join(f'{a}={b}' for a, b in o.items())} | {r} | {st} |"
              for k, cx, o, r, st in ROWS]
    spills = [f"- {k} {cx}: {st} bytes" for k, cx, _, _, st in ROWS if st]
    lines += ["", f"Launches that spill registers (stack > 0): {len(spills)} of {len(ROWS)}", ""] + spills
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
