"""The one backend dispatch of moeq_kernels: which implementation runs each op.

Each op has implementations registered per backend (``cuda`` = the compiled ``csrc/`` extension,
``triton``, ``reference`` = pure PyTorch). :func:`backend_for` picks, for an op and the tensors it gets,
the first backend in the order ``cuda > triton > reference`` whose ``supports`` predicate accepts the call,
or the backend the caller named. Naming a backend that cannot run the call raises: results never change
silently because a faster path was missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "reference")


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
    reasons = []
    for name in BACKENDS:
        if name not in impls:
            continue
        why = impls[name].supports(device, **attrs)
        if why is None:
            key = (op, device.type, name)
            if key not in _LOGGED:
                _LOGGED.add(key)
                logger.info("moeq op %s on %s uses the %s backend%s", op, device.type, name,
                            "" if not reasons else f" ({'; '.join(reasons)})")
            return name
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no backend can run {op} on {device}: {'; '.join(reasons)}")


def dispatch(op: str, device: torch.device | str, requested: str, attrs: dict, *args):
    """Run ``op`` with the backend :func:`backend_for` chooses."""
    name = backend_for(op, device, requested, **attrs)
    return _REGISTRY[op][name].fn(*args)


def describe() -> dict[str, list[str]]:
    """Registered backends per op, for logs and ``moeq info``."""
    return {op: [b for b in BACKENDS if b in impls] for op, impls in sorted(_REGISTRY.items())}
