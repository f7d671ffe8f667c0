// Which instruction-set builds of a kernel library this CPU can run, shared by the compact-layer
// kernels (sparsity_core) and the condensed inference kernel (sparsity_formats).
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparsity_isa {

// The builds this CPU can run, widest first: "avx512" (F, VL, BW, DQ), "avx2" (with FMA and
// F16C), then "portable", which runs anywhere.
inline std::vector<std::string> available() {
  std::vector<std::string> out;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    out.push_back("avx512");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    out.push_back("avx2");
  }
#endif
  out.push_back("portable");
  return out;
}

// Throws std::invalid_argument (a ValueError in Python) naming the kernel library when this CPU
// cannot run the build ``isa``.
inline void require(const std::string& isa, const std::string& what) {
  const auto have = available();
  if (std::find(have.begin(), have.end(), isa) != have.end()) return;
  std::string known;
  for (const auto& name : have) known += (known.empty() ? "" : ", ") + name;
  throw std::invalid_argument(what + ": ISA '" + isa + "' is not available on this CPU; choose " +
                              "among " + known + ".");
}

}  // namespace sparsity_isa
