"""Calibration: token windows, Hessian accumulation, and capture of expert inputs with their routing."""

from moeq.calib.stdlib import stdlib_text  # noqa: E402

__all__ = ["stdlib_text"]
