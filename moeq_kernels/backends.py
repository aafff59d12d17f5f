"""The one backend dispatch of moeq_kernels: which implementation runs each op.

Each op has implementations registered per backend (``cuda`` = the compiled ``csrc/`` extension,
``fast_hadamard_transform`` = the optional package of that name (``hadamard_transform`` only), ``triton``,
``reference`` = pure PyTorch). :func:`backend_for` picks, for an op and the tensors it gets:

* the backend the caller named; naming a backend that cannot run the call raises (results never change
  silently because a faster path was missing);
* with ``"auto"``: the backends whose ``supports`` predicate accepts the call; when several can and the op
  has a measured dispatch table (:mod:`moeq_kernels.dispatch`: ``fused_experts`` on CUDA tensors), the
  table's choice for the nearest measured point; otherwise the first in the static order :data:`BACKENDS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from moeq_kernels import dispatch as table

logger = logging.getLogger(__name__)

# Static preference order of ``auto`` where no dispatch table decides. fast_hadamard_transform sits after
# moeq's own CUDA kernel and before Triton: where it is installed and moeq's extension is not built it is
# what ``auto`` used before it had its own name (it was registered as "cuda").
BACKENDS = ("cuda", "fast_hadamard_transform", "triton", "reference")


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    ``supports(device, **attrs)`` returns None when it can run the call, or a short reason why not.
    """

    fn: Callable
    supports: Callable[..., str | None]


_REGISTRY: dict[str, dict[str, Impl]] = {}
_LOGGED: set[tuple[str, str, str]] = set()


def _always(device: torch.device, **attrs) -> str | None:
    return None


def register(op: str, backend: str, supports: Callable[..., str | None] = _always):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Impl(fn, supports)
        return fn

    return deco


def registered(op: str) -> dict[str, Impl]:
    """The implementations registered for ``op`` (backend name -> Impl)."""
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}; known ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def backend_for(op: str, device: torch.device | str, requested: str = "auto", **attrs) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    Args:
        op: op name, e.g. ``"fused_experts"``.
        device: device of the op's inputs.
        requested: ``"auto"`` or a backend name; a named backend that cannot run the call raises
            ``RuntimeError`` with its reason.
        attrs: call attributes the predicates look at (bits, group_size, dims, ...).
    """
    device = torch.device(device)
    impls = registered(op)
    if requested != "auto":
        if requested not in impls:
            raise RuntimeError(f"backend {requested!r} has no implementation of {op}; available: {sorted(impls)}")
        why = impls[requested].supports(device, **attrs)
        if why is not None:
            raise RuntimeError(f"backend {requested!r} cannot run {op} here: {why}")
        return requested
    tabled = device.type == "cuda" and op == table.load_table().op
    reasons, runnable = [], []
    for name in BACKENDS:
        if name not in impls:
            continue
        why = impls[name].supports(device, **attrs)
        if why is None:
            runnable.append(name)
            if not tabled:
                break  # static order: the first backend that can run the call
        else:
            reasons.append(f"{name}: {why}")
    if not runnable:
        raise RuntimeError(f"no backend can run {op} on {device}: {'; '.join(reasons)}")
    name, how = runnable[0], "static order"
    if len(runnable) > 1:
        index = device.index if device.index is not None else torch.cuda.current_device()
        pick = table.choose(op, table.gpu_family(index), runnable, attrs)
        if pick is not None:
            name, how = pick, "dispatch table"
    key = (op, device.type, name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("moeq op %s on %s uses the %s backend (%s%s)", op, device.type, name, how,
                    "" if not reasons else f"; {'; '.join(reasons)}")
    return name


def dispatch(op: str, device: torch.device | str, requested: str, attrs: dict, *args):
    """Run ``op`` with the backend :func:`backend_for` chooses."""
    name = backend_for(op, device, requested, **attrs)
    return _REGISTRY[op][name].fn(*args)


def describe() -> dict[str, list[str]]:
    """Registered backends per op, for logs and ``moeq info``."""
    return {op: [b for b in BACKENDS if b in impls] for op, impls in sorted(_REGISTRY.items())}
