// The GPU suites' notice: when no CUDA device is present their test cases return early, and this listener
// prints "[GPU tests skipped: no CUDA device]" at the end, which CTest reads as a skip (tests/CMakeLists.txt)
// and tools/gpu-check.sh as "no GPU seen". Include in one file per test executable.
#pragma once
#include <doctest/doctest.h>

#include <cstdio>

#include "engine/backend.h"

namespace vbtest {

inline bool has_gpu() {
  static const bool v = vb::cuda_available();
  return v;
}

struct GpuSkipNotice : doctest::IReporter {
  explicit GpuSkipNotice(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats& s) override {
    if (!has_gpu() && s.numTestCasesFailed == 0 && s.numAssertsFailed == 0) {
      std::printf("[GPU tests skipped: no CUDA device]\n");
      std::fflush(stdout);
    }
  }
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
DOCTEST_REGISTER_LISTENER("gpu_skip_notice", 1, GpuSkipNotice);

}  // namespace vbtest
