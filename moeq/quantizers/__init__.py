"""Quantizers and the method registry ``METHODS`` (method name -> handler).

A handler ``fn(model, adapter, config, calib) -> QuantReport`` quantizes every routed-experts module of
``model`` in place. Methods needing calibration data declare ``needs_calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    needs_calibration: bool
    description: str


METHODS: dict[str, Method] = {}


def register_method(name: str, needs_calibration: bool, description: str):
    def deco(fn: Callable) -> Callable:
        METHODS[name] = Method(name, fn, needs_calibration, description)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
