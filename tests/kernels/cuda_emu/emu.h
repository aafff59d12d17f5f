// CPU emulation of the parts of the CUDA execution model that csrc/moe_decode.cu and csrc/hadamard.cu use,
// so their kernel source can be checked for correctness on a machine without a GPU (tests/kernels/
// test_cuda_moe.py builds it with g++ when no CUDA device is present; on a GPU the real kernels are tested).
//
// What it emulates: the threads of a block as fibers on one OS thread (blocks run one after another),
// __syncthreads as a block-wide barrier, __shfl_xor_sync through a per-warp exchange buffer and barrier, dynamic
// shared memory poisoned with 0xFF bytes (NaN) before each block, the launch-time shared-memory limit
// (a launch above 48 KiB fails unless cudaFuncSetAttribute raised it), fp16/bf16 conversions with round to
// nearest even, and the few runtime calls the launchers make (device attributes from EMU_SMS).
// What it cannot check: inline PTX (compiled out via __CUDA_ARCH__), timing, the GPU memory model beyond
// barriers, register limits. Force-included (-include emu.h) ahead of the kernel sources; the fake
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h beside it are empty so this file defines everything.
#pragma once

#include <algorithm>
#include <array>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)

// ---------------------------------------------------------------- vector types

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---------------------------------------------------------------- 16-bit floats

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u = __float_as_uint(v);
  if (std::isnan(v)) return __nv_bfloat16{0x7FC0};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __expf(float x) { return std::exp(x); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------- runtime API subset

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorNoKernelImageForDevice = 209, cudaErrorLaunchOutOfResources = 701 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

namespace emu {
constexpr int kSmemOptin = 227 * 1024;  // H100
inline int sms() {
  const char* v = std::getenv("EMU_SMS");
  return v ? std::atoi(v) : 8;
}
inline cudaError_t& sticky() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::map<const void*, int>& smem_attr() {
  static std::map<const void*, int> m;
  return m;
}
}  // namespace emu

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sms() : emu::kSmemOptin;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute, int value) {
  if (value > emu::kSmemOptin) return cudaErrorInvalidValue;
  emu::smem_attr()[reinterpret_cast<const void*>(f)] = value;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F*, int threads, size_t smem) {
  // Registers as measured with ptxas for the decode kernels (~128 per thread at 512 threads).
  int by_threads = 2048 / threads, by_regs = 65536 / (threads * 128);
  int by_smem = smem ? static_cast<int>(228 * 1024 / smem) : 32;
  *n = std::max(0, std::min({by_threads, by_regs, by_smem}));
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::sticky();
  emu::sticky() = cudaSuccess;
  return e;
}

// ---------------------------------------------------------------- block execution

// The threads of a block are fibers (ucontext) on one OS thread: a fiber runs until it reaches a barrier
// (__syncthreads, or the warp barrier inside __shfl_xor_sync), then the scheduler runs the next one; a
// barrier opens when every live thread of its scope waits on it. When live threads remain but no barrier
// can open (threads waiting on different barriers: divergent __syncthreads / shuffles, undefined on a GPU)
// the emulator aborts with a message instead of hanging.
namespace emu {

enum class Wait { kNone, kBlock, kWarp, kExited };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = Wait::kNone;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::array<float, 32>> xch;  // shuffle exchange, one row per warp
  std::vector<unsigned char> smem;
  ucontext_t sched;
  int current = 0;
};
inline Block* g_block = nullptr;

template <class T>
T* shared_mem() {
  return reinterpret_cast<T*>(g_block->smem.data());
}

inline void wait_on(Wait w) {
  Block& b = *g_block;
  const int me = b.current;
  b.fibers[me].wait = w;
  swapcontext(&b.fibers[me].ctx, &b.sched);
  threadIdx = uint3{static_cast<unsigned>(me), 0, 0};  // resumed: restore this fiber's built-ins
}

// Runs the block's fibers to completion; false on a barrier deadlock.
inline bool schedule(Block& b, const uint3& bidx) {
  const int n = static_cast<int>(b.fibers.size());
  for (;;) {
    bool ran = false;
    for (int t = 0; t < n; ++t) {
      if (b.fibers[t].wait != Wait::kNone) continue;
      b.current = t;
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      blockIdx = bidx;
      swapcontext(&b.sched, &b.fibers[t].ctx);
      ran = true;
    }
    if (ran) continue;
    int live = 0, at_block = 0;
    for (const auto& f : b.fibers) live += f.wait != Wait::kExited, at_block += f.wait == Wait::kBlock;
    if (live == 0) return true;
    bool opened = false;
    if (at_block == live) {
      for (auto& f : b.fibers) if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      opened = true;
    }
    for (int w = 0; w < n / 32; ++w) {
      int wlive = 0, wwait = 0;
      for (int l = 0; l < 32; ++l) {
        const Wait s = b.fibers[w * 32 + l].wait;
        wlive += s != Wait::kExited, wwait += s == Wait::kWarp;
      }
      if (wlive > 0 && wwait == wlive) {
        for (int l = 0; l < 32; ++l) if (b.fibers[w * 32 + l].wait == Wait::kWarp) b.fibers[w * 32 + l].wait = Wait::kNone;
        opened = true;
      }
    }
    if (!opened) return false;
  }
}

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const auto it = smem_attr().find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it == smem_attr().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (smem > limit || threads % 32 != 0 || threads > 1024 || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "emu: bad launch (smem %zu > %zu, or %d threads, or grid)\n", smem, limit, threads);
    sticky() = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = block;
  gridDim = grid;
  static void (*entry)();
  static std::function<void()> body;
  body = [&] { kernel(args...); };
  entry = [] {
    body();
    g_block->fibers[g_block->current].wait = Wait::kExited;
    swapcontext(&g_block->fibers[g_block->current].ctx, &g_block->sched);
  };
  Block b;
  b.fibers.resize(threads);
  b.xch.resize(threads / 32);
  for (auto& f : b.fibers) f.stack.resize(256 * 1024);
  g_block = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.smem.assign(smem + 16, 0xFF);  // poison: every fp32 word reads as NaN
        for (auto& f : b.fibers) {
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, entry, 0);
          f.wait = Wait::kNone;
        }
        if (!schedule(b, uint3{bx, by, bz})) {
          std::fprintf(stderr, "emu: barrier deadlock in block (%u, %u, %u): divergent __syncthreads/shuffle\n", bx, by,
                       bz);
          std::abort();
        }
      }
    }
  }
  g_block = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::wait_on(emu::Wait::kBlock); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& x = emu::g_block->xch[w];
  x[lane] = v;
  emu::wait_on(emu::Wait::kWarp);
  const float r = x[lane ^ off];
  emu::wait_on(emu::Wait::kWarp);
  return r;
}
