// The fully connected layer, y [N,OUT] = x [N,IN] w^T + b, and its backward, on the GEMM.
#include <algorithm>

#include "kernels/cpu/ops.h"

namespace vb::cpu {

template <class T>
void linear_fwd(int N, int IN, int OUT, const T* x, const T* w, const T* b, T* y) {
  if (b)
    for (int n = 0; n < N; ++n) std::copy(b, b + OUT, y + int64_t(n) * OUT);
  gemm<T>(false, true, N, OUT, IN, T(1), x, IN, w, IN, b ? T(1) : T(0), y, OUT);
}

template <class T>
void linear_bwd(int N, int IN, int OUT, const T* x, const T* w, const T* dy, T* dx, T* dw, T* db) {
  if (dx) gemm<T>(false, false, N, IN, OUT, T(1), dy, OUT, w, IN, T(0), dx, IN);  // dy [N,OUT] w [OUT,IN]
  if (dw) gemm<T>(true, false, OUT, IN, N, T(1), dy, OUT, x, IN, T(0), dw, IN);   // dy^T [OUT,N] x [N,IN]
  if (db)
    for (int o = 0; o < OUT; ++o) {
      double s = 0;
      for (int n = 0; n < N; ++n) s += double(dy[int64_t(n) * OUT + o]);
      db[o] = T(s);
    }
}

#define VB_INSTANTIATE_LINEAR(T)                                                \
  template void linear_fwd<T>(int, int, int, const T*, const T*, const T*, T*); \
  template void linear_bwd<T>(int, int, int, const T*, const T*, const T*, T*, T*, T*);
VB_INSTANTIATE_LINEAR(float)
VB_INSTANTIATE_LINEAR(double)
#undef VB_INSTANTIATE_LINEAR

}  // namespace vb::cpu
