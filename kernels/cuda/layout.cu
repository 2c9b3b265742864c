// Batched transpose through shared memory (see layout.cuh): each block moves one 32 x 32 tile of one matrix,
// reading rows of src and writing rows of dst along memory (coalesced both ways); the tile has one column of
// padding so that the column reads from shared memory fall in distinct banks.
#include "kernels/check.h"
#include "kernels/cuda/layout.cuh"

namespace vb::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // a block is 32 x 8 threads; each thread moves 4 values each way

__global__ void transpose_kernel(int R, int S, int tiles_r, int tiles_s, const float* __restrict__ src,
                                 float* __restrict__ dst) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t per_matrix = int64_t(tiles_r) * tiles_s;
  const int64_t b = blockIdx.x / per_matrix;
  const int64_t t = blockIdx.x % per_matrix;
  const int r0 = int(t / tiles_s) * kTile, s0 = int(t % tiles_s) * kTile;
  const float* m = src + b * int64_t(R) * S;
  float* o = dst + b * int64_t(R) * S;
  for (int i = threadIdx.y; i < kTile; i += kRowsPerPass) {
    const int r = r0 + i, s = s0 + threadIdx.x;
    if (r < R && s < S) tile[i][threadIdx.x] = m[int64_t(r) * S + s];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += kRowsPerPass) {
    const int s = s0 + i, r = r0 + threadIdx.x;
    if (s < S && r < R) o[int64_t(s) * R + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

void transpose_batched(cudaStream_t st, int64_t B, int R, int S, const float* src, float* dst) {
  VB_CHECK(B >= 0 && R >= 0 && S >= 0, "transpose: bad shape B=", B, " R=", R, " S=", S);
  if (B == 0 || R == 0 || S == 0) return;
  if (R == 1 || S == 1) {  // the same bytes in both orders
    VB_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(float) * size_t(B) * R * S, cudaMemcpyDeviceToDevice, st));
    return;
  }
  const int tiles_r = (R + kTile - 1) / kTile, tiles_s = (S + kTile - 1) / kTile;
  const int64_t blocks = B * tiles_r * tiles_s;
  VB_CHECK(blocks <= 0x7fffffff, "transpose: ", blocks, " tiles exceed one grid");
  transpose_kernel<<<unsigned(blocks), dim3(kTile, kRowsPerPass), 0, st>>>(R, S, tiles_r, tiles_s, src, dst);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
