// The CPU thread pool behind parallel_for.
//
// Chunking: [0, n) is cut into ceil(n / chunk) contiguous chunks of `chunk` = max(grain, ceil(n / kMaxChunks))
// elements. That depends on n and grain only, so an op that reduces per chunk and combines the partials in
// chunk order gets the same bits whatever the thread count; threads (the caller included) take chunks from a
// shared counter, which balances uneven chunks without changing what each chunk computes.
//
// One job runs at a time. A call made while a job runs (from inside fn, i.e. nested, or from another thread
// of the program) runs its chunks serially on the calling thread, in order: same chunks, same results.
// A call whose range is a single chunk is not a job: fn runs at once on the caller, and calls made inside
// it may still use the pool (a batch of one can then parallelise inside each sample).
// Workers spin briefly before sleeping on a condition variable so that back-to-back small ops don't pay a
// wake-up each, and the caller never waits for a helper that had not started by the time every chunk was
// taken: a small op costs a few microseconds even when the machine is busy.
#include "kernels/cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/check.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VB_CPU_RELAX() _mm_pause()
#else
#define VB_CPU_RELAX() ((void)0)
#endif

namespace vb::cpu {
namespace {

constexpr int64_t kMaxChunks = 1024;
constexpr int kSpinIters = 2000;  // some tens of microseconds of polling before a worker sleeps

thread_local bool t_in_parallel = false;  // true on a thread while it runs chunks of a job

int hardware_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : int(h);
}

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }
  ~Pool() { stop_workers(); }

  void resize(int n) {
    if (n <= 0) n = hardware_threads();
    std::lock_guard<std::mutex> run(run_mutex_);  // never while a job runs
    if (n == threads_.load()) return;
    stop_workers();
    threads_.store(n);
    start_workers();
  }
  int size() const { return threads_.load(std::memory_order_relaxed); }

  // Runs fn over the chunks; false when the pool is busy (the caller then runs the chunks itself).
  bool run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> run(run_mutex_, std::try_to_lock);
    if (!run.owns_lock()) return false;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    nchunks_ = nchunks;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    const int helpers = int(std::min<int64_t>(int64_t(workers_.size()), nchunks - 1));
    active_.store(helpers, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mutex_);
      wanted_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (helpers > 0) cv_.notify_all();
    work();
    // Every chunk is taken. Helpers that have not checked in yet are not waited for (waking a sleeping or
    // descheduled thread only for it to find nothing left would put its latency on every call); those that
    // did are finishing their last chunk (they only touch fn_ while active).
    {
      std::lock_guard<std::mutex> lk(mutex_);
      active_.fetch_sub(wanted_, std::memory_order_acq_rel);
      wanted_ = 0;
    }
    for (int spin = 0; active_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < kSpinIters) {
        VB_CPU_RELAX();
      } else {
        std::unique_lock<std::mutex> lk(mutex_);
        done_cv_.wait(lk, [&] { return active_.load(std::memory_order_acquire) == 0; });
      }
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  Pool() : threads_(hardware_threads()) { start_workers(); }

  void start_workers() {
    stopping_ = false;
    // Each worker starts from the generation current now, so a bump that happens before it runs is seen.
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int i = 1; i < threads_.load(); ++i) workers_.emplace_back([this, gen] { worker_loop(gen); });
  }
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  // Takes chunks until none are left; records the first exception and skips the rest.
  void work() {
    t_in_parallel = true;
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks_) break;
      if (failed_.load(std::memory_order_relaxed)) continue;
      const int64_t b = c * chunk_, e = std::min(n_, b + chunk_);
      try {
        (*fn_)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_relaxed);
      }
    }
    t_in_parallel = false;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Spin a little for the next job, then sleep.
      int spin = 0;
      while (generation_.load(std::memory_order_acquire) == seen && spin < kSpinIters) {
        VB_CPU_RELAX();
        ++spin;
      }
      {
        std::unique_lock<std::mutex> lk(mutex_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        if (stopping_) return;
        if (wanted_ == 0) continue;  // this job needs fewer helpers than there are workers
        --wanted_;
      }
      work();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mutex_);
        done_cv_.notify_one();
      }
    }
  }

  std::atomic<int> threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // held by the thread that owns the current job

  std::mutex mutex_;  // guards wanted_, stopping_, error_ and the sleeps
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};
  bool stopping_ = false;
  int wanted_ = 0;
  std::atomic<int> active_{0};

  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1, nchunks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

}  // namespace

void set_num_threads(int n) {
  VB_CHECK(!t_in_parallel, "set_num_threads called from inside parallel_for");
  Pool::get().resize(n);
}
int num_threads() { return Pool::get().size(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunk = std::max(grain, (n + kMaxChunks - 1) / kMaxChunks);
  const bool single = chunk >= n;
  if (single) {
    fn(0, n);
    return;
  }
  if (!t_in_parallel && Pool::get().size() > 1 && Pool::get().run(n, chunk, fn)) return;
  // Serial: the same chunks, in order. Marked as inside a job so that deeper calls stay serial too.
  const bool outer = t_in_parallel;
  t_in_parallel = true;
  try {
    for (int64_t b = 0; b < n; b += chunk) fn(b, std::min(n, b + chunk));
  } catch (...) {
    t_in_parallel = outer;
    throw;
  }
  t_in_parallel = outer;
}

}  // namespace vb::cpu
