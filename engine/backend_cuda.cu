// Placeholder until the CUDA backend lands: keeps the build linking with CUDA on.
#include "engine/backend.h"

namespace vb {
bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
std::unique_ptr<Backend> make_cuda_backend(int) { fail("the CUDA backend is not implemented yet"); }
}  // namespace vb
