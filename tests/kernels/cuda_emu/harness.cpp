// Driver of the CPU emulation (emu.h): runs the real launchers of csrc/moe_decode.cu and csrc/hadamard.cu on
// inputs written by tests/kernels/test_cuda_moe.py and writes the outputs back.
//
//   harness moe <dir>       meta.txt: T k E H I g13 g2 act s13 s2 wdt ids z13 z2 hadamard
//                           (dtype codes as moeq::FloatDType / IndexDType), arrays hidden.bin ids.bin
//                           weights.bin w13q.bin w13s.bin [w13z.bin] w2q.bin w2s.bin [w2z.bin] -> out.bin
//   harness hadamard <dir>  meta.txt: rows n dtype scale, x.bin -> y.bin
// Outputs are poisoned (0xFF bytes: NaN) before the launch, so an unwritten element shows. The test build
// (test_cuda_moe.py) compiles this file with the kernel sources included, their <<<>>> launches rewritten
// as emu::launch(...) calls.
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "moe_decode.h"

using Bytes = std::vector<unsigned char>;

static Bytes read_file(const std::string& path, bool required = true) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    if (required) {
      std::cerr << "harness: cannot read " << path << "\n";
      std::exit(2);
    }
    return {};
  }
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

static void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

static int run_moe(const std::string& dir) {
  std::ifstream meta(dir + "/meta.txt");
  int64_t T, k, E, H, I, g13, g2;
  int act, s13, s2, wdt, ids, z13, z2, had;
  meta >> T >> k >> E >> H >> I >> g13 >> g2 >> act >> s13 >> s2 >> wdt >> ids >> z13 >> z2 >> had;
  if (!meta) {
    std::cerr << "harness: bad meta.txt\n";
    return 2;
  }
  Bytes hidden = read_file(dir + "/hidden.bin"), idv = read_file(dir + "/ids.bin"),
        wts = read_file(dir + "/weights.bin"), w13q = read_file(dir + "/w13q.bin"), w13s = read_file(dir + "/w13s.bin"),
        w13z = read_file(dir + "/w13z.bin", z13 != 0), w2q = read_file(dir + "/w2q.bin"),
        w2s = read_file(dir + "/w2s.bin"), w2z = read_file(dir + "/w2z.bin", z2 != 0);
  std::vector<float> h(static_cast<size_t>(T * k * I));
  std::memset(h.data(), 0xFF, h.size() * 4);
  Bytes out(static_cast<size_t>(T * H * 2), 0xFF);

  moeq::MoeDecodeParams p;
  p.hidden = hidden.data();
  p.topk_ids = idv.data();
  p.topk_weights = wts.data();
  p.w13_qweight = reinterpret_cast<const int32_t*>(w13q.data());
  p.w13_scales = w13s.data();
  p.w13_qzeros = z13 ? w13z.data() : nullptr;
  p.w2_qweight = reinterpret_cast<const int32_t*>(w2q.data());
  p.w2_scales = w2s.data();
  p.w2_qzeros = z2 ? w2z.data() : nullptr;
  p.h = h.data();
  p.out = out.data();
  p.num_tokens = T;
  p.top_k = k;
  p.num_experts = E;
  p.hidden_dim = H;
  p.inter_dim = I;
  p.group13 = g13;
  p.group2 = g2;
  p.act_dtype = static_cast<moeq::FloatDType>(act);
  p.w13_scale_dtype = static_cast<moeq::FloatDType>(s13);
  p.w2_scale_dtype = static_cast<moeq::FloatDType>(s2);
  p.weights_dtype = static_cast<moeq::FloatDType>(wdt);
  p.ids_dtype = static_cast<moeq::IndexDType>(ids);
  p.online_hadamard = had != 0;
  p.hadamard_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(I)));
  if (const char* why = moeq::moe_decode_unsupported(p, 0)) {
    std::cerr << "harness: unsupported: " << why << "\n";
    return 3;
  }
  const cudaError_t err = moeq::moe_decode_launch(p, nullptr);
  if (err != cudaSuccess) {
    std::cerr << "harness: launch failed: " << static_cast<int>(err) << "\n";
    return 4;
  }
  write_file(dir + "/out.bin", out.data(), out.size());
  return 0;
}

static int run_hadamard(const std::string& dir) {
  std::ifstream meta(dir + "/meta.txt");
  int64_t rows, n;
  int dtype;
  float scale;
  meta >> rows >> n >> dtype >> scale;
  if (!meta) {
    std::cerr << "harness: bad meta.txt\n";
    return 2;
  }
  Bytes x = read_file(dir + "/x.bin");
  Bytes y(x.size(), 0xFF);
  if (const char* why = moeq::hadamard_unsupported(n, 0)) {
    std::cerr << "harness: unsupported: " << why << "\n";
    return 3;
  }
  moeq::HadamardParams p;
  p.x = x.data();
  p.y = y.data();
  p.rows = rows;
  p.n = n;
  p.scale = scale;
  p.dtype = static_cast<moeq::FloatDType>(dtype);
  const cudaError_t err = moeq::hadamard_launch(p, nullptr);
  if (err != cudaSuccess) {
    std::cerr << "harness: launch failed: " << static_cast<int>(err) << "\n";
    return 4;
  }
  write_file(dir + "/y.bin", y.data(), y.size());
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: harness moe|hadamard <dir>\n";
    return 2;
  }
  const std::string mode = argv[1];
  return mode == "moe" ? run_moe(argv[2]) : mode == "hadamard" ? run_hadamard(argv[2]) : 2;
}
