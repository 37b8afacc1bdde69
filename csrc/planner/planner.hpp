// Static memory planner: assigns every buffer an offset in one arena so that buffers whose
// lifetimes overlap never overlap in memory.
//
// The problem is dynamic storage allocation (NP-hard); we run greedy best-fit placement under a few
// orderings and keep the smallest arena. Everything is deterministic: same input, same plan.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace helios::planner {

inline constexpr int64_t kDefaultAlignment = 256;

// One buffer to place. It is live from step `first` to step `last`, both inclusive.
struct Buffer {
  int64_t id;
  int64_t size;  // bytes, >= 0; rounded up to the alignment before placement
  int64_t first;
  int64_t last;
};

struct Plan {
  std::vector<int64_t> offsets;  // offsets[i] belongs to buffers[i]; multiples of the alignment
  int64_t arena_bytes = 0;
  int64_t lower_bound_bytes = 0;  // max over steps of the aligned bytes live at that step
  int64_t alignment = 0;
  std::string strategy;  // the placement order that produced this plan
};

// Plans `buffers`. Throws std::invalid_argument (ValueError in Python) naming the offending buffer
// id when a size is negative, first > last, an id repeats, or sizes overflow int64; and when
// `alignment` is not a positive power of two.
Plan plan(const std::vector<Buffer>& buffers, int64_t alignment = kDefaultAlignment);

// The lower bound alone (validates like plan()): no arena can be smaller than this.
int64_t lower_bound(const std::vector<Buffer>& buffers, int64_t alignment = kDefaultAlignment);

}  // namespace helios::planner
