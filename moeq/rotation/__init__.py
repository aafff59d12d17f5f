"""QuaRot-style rotation: RMSNorm fusion, residual-stream Hadamard rotation, online Hadamard on down inputs."""

from moeq.rotation.rotate import ROTATIONS, RotationError, rotate_model

__all__ = ["ROTATIONS", "RotationError", "rotate_model"]
