// The CPU path's thread pool: one per process, created on first use, sized by set_num_threads (default:
// all cores). parallel_for splits [0, n) into contiguous chunks; the chunking depends only on n and grain,
// never on timing, so a reduction done per chunk and combined in chunk order is deterministic.
#pragma once
#include <cstdint>
#include <functional>

namespace vb::cpu {

void set_num_threads(int n);  // 0 = all cores
int num_threads();

// Calls fn(begin, end) over chunks of [0, n) on the pool's threads (the caller's thread works too).
// grain: the smallest chunk worth a thread. Nested calls run serially on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace vb::cpu
