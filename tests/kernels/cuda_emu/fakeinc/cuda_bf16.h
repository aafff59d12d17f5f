// Empty on purpose: tests/kernels/cuda_emu/emu.h (force-included) defines what the kernels use.
#pragma once
