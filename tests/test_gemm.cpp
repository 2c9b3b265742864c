// The CPU GEMM against a naive triple loop in long double: all four transpose combinations, odd sizes (edge
// tiles, sizes straddling the blocking, both orientations the driver picks), leading dimensions larger than
// the matrices, alpha and beta, beta == 0 never reading C; and bit-identical results for 1, 2 and 3 threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "tests/test_util.h"

using vb::cpu::gemm;

namespace {

using vbtest::random_vec;

struct Case {
  int M, N, K;
};

// Sizes: tiny, odd, straddling the micro-tile (6 x 16 / 6 x 8), the K block (256 / 384) and N small next to
// M (the driver then computes C^T).
const Case kCases[] = {{1, 1, 1},     {1, 17, 3},   {5, 1, 9},     {6, 16, 8},     {7, 17, 385},
                       {13, 33, 257}, {50, 3, 100}, {97, 61, 771}, {130, 200, 64}, {3, 130, 5}};

template <class T>
void check_against_naive(bool ta, bool tb, const Case& c, T alpha, T beta, double tol) {
  const int M = c.M, N = c.N, K = c.K;
  // Leading dimensions wider than needed, to catch a stride mix-up.
  const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
  const auto A = random_vec<T>(size_t(ta ? K : M) * lda, 1 + M);
  const auto B = random_vec<T>(size_t(tb ? N : K) * ldb, 2 + N);
  auto C = random_vec<T>(size_t(M) * ldc, 3 + K);
  auto C0 = C;
  if (beta == T(0)) vbtest::poison(C);  // beta == 0 must not read C
  const auto before = C;
  gemm<T>(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);

  std::vector<double> got, want;
  double max_abs_ref = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      long double acc = 0, abs_acc = 0;
      for (int k = 0; k < K; ++k) {
        const long double a = ta ? A[size_t(k) * lda + i] : A[size_t(i) * lda + k];
        const long double b = tb ? B[size_t(j) * ldb + k] : B[size_t(k) * ldb + j];
        acc += a * b;
        abs_acc += std::fabs(double(a * b));
      }
      long double ref = (long double)alpha * acc;
      if (beta != T(0)) ref += (long double)beta * C0[size_t(i) * ldc + j];
      got.push_back(double(C[size_t(i) * ldc + j]));
      want.push_back(double(ref));
      max_abs_ref = std::max(max_abs_ref, double(abs_acc));
    }
  INFO("M=" << M << " N=" << N << " K=" << K << " transA=" << ta << " transB=" << tb << " alpha=" << alpha
            << " beta=" << beta);
  // Float rounding of a K-term dot product: a few ulps of sum |a*b| per element.
  vbtest::check_close("C", got, want, tol * (max_abs_ref + 1), 0);
  // The padding columns of C (beyond N) are untouched.
  for (int i = 0; i < M; ++i)
    REQUIRE(std::memcmp(&C[size_t(i) * ldc + N], &before[size_t(i) * ldc + N], sizeof(T) * size_t(ldc - N)) == 0);
}

}  // namespace

TEST_CASE("gemm float matches a naive loop for every transpose, odd sizes, alpha and beta") {
  for (const Case& c : kCases)
    for (int t = 0; t < 4; ++t) {
      check_against_naive<float>(t & 1, t & 2, c, 1.0f, 0.0f, 1e-6);
      check_against_naive<float>(t & 1, t & 2, c, -1.5f, 0.5f, 1e-6);
      check_against_naive<float>(t & 1, t & 2, c, 0.25f, 1.0f, 1e-6);
    }
}

TEST_CASE("gemm double matches a naive loop for every transpose, odd sizes, alpha and beta") {
  for (const Case& c : kCases)
    for (int t = 0; t < 4; ++t) {
      check_against_naive<double>(t & 1, t & 2, c, 1.0, 0.0, 1e-14);
      check_against_naive<double>(t & 1, t & 2, c, 0.75, -2.0, 1e-14);
    }
}

TEST_CASE("gemm with K == 0 or alpha == 0 scales C by beta") {
  std::vector<float> C = {1, 2, 3, 4, 5, 6};
  gemm<float>(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 2.0f, C.data(), 3);
  CHECK(C == std::vector<float>{2, 4, 6, 8, 10, 12});
  vbtest::poison(C);
  gemm<float>(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.0f, C.data(), 3);
  CHECK(C == std::vector<float>(6, 0.0f));
}

TEST_CASE("gemm results are bit-identical for 1, 2 and 3 threads") {
  const int saved = vb::cpu::num_threads();
  const Case big[] = {{200, 300, 800}, {512, 49, 1000}, {64, 3136, 147}, {7, 4100, 20}};
  for (const Case& c : big)
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const auto A = random_vec<float>(size_t(c.M) * c.K, 11);
      const auto B = random_vec<float>(size_t(c.K) * c.N, 12);
      const auto C0 = random_vec<float>(size_t(c.M) * c.N, 13);
      std::vector<std::vector<float>> out;
      for (int threads : {1, 2, 3}) {
        vb::cpu::set_num_threads(threads);
        auto C = C0;
        gemm<float>(ta, tb, c.M, c.N, c.K, 1.0f, A.data(), ta ? c.M : c.K, B.data(), tb ? c.K : c.N, 0.5f, C.data(),
                    c.N);
        out.push_back(std::move(C));
      }
      INFO("M=" << c.M << " N=" << c.N << " K=" << c.K << " transA=" << ta << " transB=" << tb);
      CHECK(std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)) == 0);
      CHECK(std::memcmp(out[0].data(), out[2].data(), out[0].size() * sizeof(float)) == 0);
    }
  vb::cpu::set_num_threads(saved);
}

TEST_CASE("parallel_for covers every index once, with chunking independent of the thread count") {
  const int saved = vb::cpu::num_threads();
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000), int64_t(123457)})
    for (int64_t grain : {int64_t(1), int64_t(3), int64_t(5000)}) {
      std::vector<std::vector<std::pair<int64_t, int64_t>>> chunkings;
      for (int threads : {1, 2, 3}) {
        vb::cpu::set_num_threads(threads);
        std::vector<int> hits(size_t(n), 0);
        std::vector<std::pair<int64_t, int64_t>> chunks(size_t(n), {-1, -1});
        vb::cpu::parallel_for(n, grain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            ++hits[size_t(i)];
            chunks[size_t(i)] = {b, e};
          }
          // A nested call covers its range too; when the outer call has several chunks it runs on this thread.
          const auto self = std::this_thread::get_id();
          std::atomic<int> inner{0}, elsewhere{0};
          vb::cpu::parallel_for(10, 1, [&](int64_t b2, int64_t e2) {
            inner += int(e2 - b2);
            if (std::this_thread::get_id() != self) ++elsewhere;
          });
          REQUIRE(inner == 10);
          if (e - b < n) REQUIRE(elsewhere == 0);
        });
        for (int h : hits) REQUIRE(h == 1);
        chunkings.push_back(std::move(chunks));
      }
      CHECK(chunkings[0] == chunkings[1]);
      CHECK(chunkings[0] == chunkings[2]);
    }
  vb::cpu::set_num_threads(saved);
}

TEST_CASE("parallel_for passes an exception to the caller and stays usable") {
  const int saved = vb::cpu::num_threads();
  vb::cpu::set_num_threads(2);
  CHECK_THROWS_AS(vb::cpu::parallel_for(100, 1,
                                        [](int64_t b, int64_t) {
                                          if (b == 50) throw std::runtime_error("boom");
                                        }),
                  std::runtime_error);
  std::atomic<int64_t> sum{0};
  vb::cpu::parallel_for(100, 1, [&](int64_t b, int64_t e) { sum += e - b; });
  CHECK(sum == 100);
  vb::cpu::set_num_threads(saved);
}
