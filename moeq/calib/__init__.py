"""Calibration: token windows, Hessian accumulation, and capture of expert inputs with their routing."""
