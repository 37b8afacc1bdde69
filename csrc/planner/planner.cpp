#include "planner/planner.hpp"

#include <algorithm>
#include <exception>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

namespace helios::planner {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

[[noreturn]] void fail(int64_t id, const std::string& problem) {
  throw std::invalid_argument("buffer id " + std::to_string(id) + ": " + problem);
}

// The buffers as the placer sees them: aligned sizes and steps renumbered 0..num_steps-1 (an
// order-preserving renumbering keeps every lifetime overlap, and bounds the step range by 2n).
struct Problem {
  std::vector<int64_t> id;
  std::vector<int64_t> size;
  std::vector<int32_t> first;
  std::vector<int32_t> last;
  std::vector<int64_t> span;  // real lifetime length in steps, saturated at int64 max
  int32_t num_steps = 0;
  size_t count() const { return size.size(); }
};

void check_alignment(int64_t alignment) {
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0) {
    throw std::invalid_argument("alignment must be a positive power of two, got " +
                                std::to_string(alignment));
  }
}

void validate(const std::vector<Buffer>& buffers, int64_t alignment) {
  check_alignment(alignment);
  if (buffers.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2)) {
    throw std::invalid_argument("too many buffers: " + std::to_string(buffers.size()));
  }
  std::unordered_map<int64_t, size_t> position;
  position.reserve(buffers.size() * 2);
  int64_t total = 0;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Buffer& b = buffers[i];
    if (b.size < 0) fail(b.id, "size " + std::to_string(b.size) + " is negative");
    if (b.first > b.last) {
      fail(b.id, "first use step " + std::to_string(b.first) + " is after last use step " +
                     std::to_string(b.last));
    }
    auto [it, inserted] = position.emplace(b.id, i);
    if (!inserted) {
      fail(b.id, "duplicate id (buffers " + std::to_string(it->second) + " and " +
                     std::to_string(i) + " of the request list)");
    }
    if (b.size > kInt64Max - (alignment - 1) || total > kInt64Max - b.size - (alignment - 1)) {
      fail(b.id, "size " + std::to_string(b.size) + " makes the total size overflow int64");
    }
    total += (b.size + alignment - 1) & ~(alignment - 1);
  }
}

Problem normalize(const std::vector<Buffer>& buffers, int64_t alignment) {
  validate(buffers, alignment);
  const size_t n = buffers.size();
  std::vector<int64_t> steps;
  steps.reserve(2 * n);
  for (const Buffer& b : buffers) {
    steps.push_back(b.first);
    steps.push_back(b.last);
  }
  std::sort(steps.begin(), steps.end());
  steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
  auto rank = [&](int64_t step) {
    return static_cast<int32_t>(std::lower_bound(steps.begin(), steps.end(), step) - steps.begin());
  };
  Problem p;
  p.num_steps = static_cast<int32_t>(steps.size());
  p.id.resize(n);
  p.size.resize(n);
  p.first.resize(n);
  p.last.resize(n);
  p.span.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Buffer& b = buffers[i];
    p.id[i] = b.id;
    p.size[i] = (b.size + alignment - 1) & ~(alignment - 1);
    p.first[i] = rank(b.first);
    p.last[i] = rank(b.last);
    // last - first + 1 computed in unsigned arithmetic: it cannot overflow there.
    const uint64_t span = static_cast<uint64_t>(b.last) - static_cast<uint64_t>(b.first) + 1;
    p.span[i] = span == 0 || span > static_cast<uint64_t>(kInt64Max) ? kInt64Max
                                                                        : static_cast<int64_t>(span);
  }
  return p;
}

int64_t peak_live_bytes(const Problem& p) {
  std::vector<int64_t> delta(static_cast<size_t>(p.num_steps) + 1, 0);
  for (size_t i = 0; i < p.count(); ++i) {
    delta[p.first[i]] += p.size[i];
    delta[p.last[i] + 1] -= p.size[i];
  }
  int64_t live = 0, peak = 0;
  for (int64_t d : delta) {
    live += d;
    peak = std::max(peak, live);
  }
  return peak;
}

// A placed buffer: where it sits in memory and when it is live (renumbered steps).
struct Slot {
  int64_t offset;
  int64_t end;
  int32_t first;
  int32_t last;
};

using Span = std::pair<int64_t, int64_t>;  // [offset, end) in the arena

// Placed buffers, bucketed by step and kept sorted by offset inside each bucket: the placed buffers
// whose lifetime overlaps a new one come out as a few sorted runs, merged in linear time, so
// placing a buffer costs about the number of buffers it conflicts with (no per-buffer sort).
class PlacedIndex {
 public:
  explicit PlacedIndex(const Problem& p) {
    int64_t total_span = 0;
    for (size_t i = 0; i < p.count(); ++i) total_span += p.last[i] - p.first[i] + 1;
    // Buckets as wide as the mean lifetime: a buffer lands in about two of them.
    width_ = static_cast<int32_t>(std::max<int64_t>(1, total_span / std::max<size_t>(1, p.count())));
    buckets_.resize(static_cast<size_t>(p.num_steps / width_) + 1);
  }

  void insert(const Slot& s) {
    for (int32_t b = s.first / width_; b <= s.last / width_; ++b) {
      std::vector<Slot>& bucket = buckets_[b];
      auto at = std::upper_bound(bucket.begin(), bucket.end(), s.offset,
                                 [](int64_t offset, const Slot& t) { return offset < t.offset; });
      bucket.insert(at, s);
    }
  }

  // The spans of the placed buffers live at some step of [first, last], sorted by offset. Valid
  // until the next call.
  std::pair<const Span*, const Span*> conflicts(int32_t first, int32_t last) {
    const int32_t lo = first / width_, hi = last / width_;
    size_t candidates = 0;
    for (int32_t b = lo; b <= hi; ++b) candidates += buckets_[b].size();
    if (out_.size() < candidates) {  // grow only: resizing down and up would re-zero the buffers
      out_.resize(candidates);
      scratch_.resize(candidates);
    }
    runs_.assign(1, 0);
    Span* out = out_.data();
    size_t kept = 0;
    for (int32_t b = lo; b <= hi; ++b) {
      // A slot sits in every bucket it touches: take it from the first bucket both scan.
      const int32_t min_first = b == lo ? std::numeric_limits<int32_t>::min() : b * width_;
      // Branch-free filter: the test is a coin flip on random inputs, so always write, and keep.
      for (const Slot& s : buckets_[b]) {
        out[kept] = {s.offset, s.end};
        kept += (s.first >= min_first) & (s.first <= last) & (s.last >= first);
      }
      if (kept > runs_.back()) runs_.push_back(kept);
    }
    return merge_runs();
  }

 private:
  // Bottom-up merge of the sorted runs out_[runs_[k], runs_[k+1]).
  std::pair<const Span*, const Span*> merge_runs() {
    auto by_offset = [](const Span& x, const Span& y) { return x.first < y.first; };
    while (runs_.size() > 2) {
      merged_.assign(1, 0);
      for (size_t k = 0; k + 1 < runs_.size(); k += 2) {
        const size_t a = runs_[k], m = runs_[k + 1];
        const size_t z = k + 2 < runs_.size() ? runs_[k + 2] : m;
        std::merge(out_.data() + a, out_.data() + m, out_.data() + m, out_.data() + z,
                   scratch_.data() + a, by_offset);
        merged_.push_back(z);
      }
      out_.swap(scratch_);
      runs_.swap(merged_);
    }
    return {out_.data(), out_.data() + runs_.back()};
  }

  int32_t width_ = 1;
  std::vector<std::vector<Slot>> buckets_;
  std::vector<size_t> runs_, merged_;
  std::vector<Span> out_, scratch_;
};

// Lowest offset of the smallest gap between `busy` spans (sorted by offset) that holds `size`
// bytes; past the last span when no gap does.
int64_t best_fit(std::pair<const Span*, const Span*> busy, int64_t size) {
  int64_t cursor = 0, best = -1, best_gap = kInt64Max;
  for (const Span* span = busy.first; span != busy.second; ++span) {
    const auto [start, end] = *span;
    const int64_t gap = start - cursor;
    if (gap >= size && gap < best_gap) {
      best = cursor;
      best_gap = gap;
      if (gap == size) break;  // an exact fit cannot be beaten
    }
    cursor = std::max(cursor, end);
  }
  return best >= 0 ? best : cursor;
}

struct Placement {
  std::vector<int64_t> offsets;
  int64_t arena = 0;
};

Placement place_in_order(const Problem& p, const std::vector<int32_t>& order) {
  Placement out;
  out.offsets.assign(p.count(), 0);
  PlacedIndex placed(p);
  for (int32_t i : order) {
    if (p.size[i] == 0) continue;  // occupies nothing: offset 0 overlaps no one
    const int64_t offset = best_fit(placed.conflicts(p.first[i], p.last[i]), p.size[i]);
    out.offsets[i] = offset;
    out.arena = std::max(out.arena, offset + p.size[i]);
    placed.insert({offset, offset + p.size[i], p.first[i], p.last[i]});
  }
  return out;
}

using Less = std::function<bool(int32_t, int32_t)>;

struct Strategy {
  const char* name;
  Less before;  // a strict total order: every key ends with the (unique) id
};

__extension__ typedef __int128 int128;  // size * lifetime can exceed int64

std::vector<Strategy> strategies(const Problem& p) {
  auto area = [&p](int32_t i) { return static_cast<int128>(p.size[i]) * p.span[i]; };
  return {
      {"size", [&p](int32_t a, int32_t b) {
         if (p.size[a] != p.size[b]) return p.size[a] > p.size[b];
         return p.id[a] < p.id[b];
       }},
      {"size*lifetime", [&p, area](int32_t a, int32_t b) {
         if (area(a) != area(b)) return area(a) > area(b);
         if (p.size[a] != p.size[b]) return p.size[a] > p.size[b];
         return p.id[a] < p.id[b];
       }},
      {"lifetime", [&p](int32_t a, int32_t b) {
         if (p.span[a] != p.span[b]) return p.span[a] > p.span[b];
         if (p.size[a] != p.size[b]) return p.size[a] > p.size[b];
         return p.id[a] < p.id[b];
       }},
      // Allocation order, as a caching allocator would see it: best when lifetimes are alike.
      {"first use", [&p](int32_t a, int32_t b) {
         if (p.first[a] != p.first[b]) return p.first[a] < p.first[b];
         if (p.size[a] != p.size[b]) return p.size[a] > p.size[b];
         return p.id[a] < p.id[b];
       }},
  };
}

Placement run_strategy(const Problem& p, const Strategy& s) {
  std::vector<int32_t> order(p.count());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), s.before);
  return place_in_order(p, order);
}

// Below this many buffers planning takes milliseconds: threads would cost more than they save.
constexpr size_t kThreadsFrom = 8192;

// Small problems run the strategies in turn and stop at the first one that reaches the lower bound;
// large ones run them all on threads. The caller keeps the smallest arena with ties going to the
// earlier strategy, so both ways give the same plan.
std::vector<Placement> run_strategies(const Problem& p, const std::vector<Strategy>& all,
                                      int64_t bound) {
  std::vector<Placement> placements(all.size());
  // When every buffer is live at one step (bound == total), the first strategy packs them
  // back to back and is optimal: running the others would only waste time.
  const int64_t total = std::accumulate(p.size.begin(), p.size.end(), int64_t{0});
  if (p.count() < kThreadsFrom || bound == total || std::thread::hardware_concurrency() < 2) {
    for (size_t k = 0; k < all.size(); ++k) {
      placements[k] = run_strategy(p, all[k]);
      if (placements[k].arena == bound) {
        placements.resize(k + 1);
        break;
      }
    }
    return placements;
  }
  std::vector<std::exception_ptr> errors(all.size());
  auto work = [&](size_t k) {
    try {
      placements[k] = run_strategy(p, all[k]);
    } catch (...) {
      errors[k] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  size_t started = 0;
  try {
    for (; started < all.size(); ++started) threads.emplace_back(work, started);
  } catch (const std::system_error&) {
    // No more threads to be had: do the rest on this one.
  }
  for (size_t k = started; k < all.size(); ++k) work(k);
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return placements;
}

}  // namespace

int64_t lower_bound(const std::vector<Buffer>& buffers, int64_t alignment) {
  return peak_live_bytes(normalize(buffers, alignment));
}

Plan plan(const std::vector<Buffer>& buffers, int64_t alignment) {
  const Problem p = normalize(buffers, alignment);
  const int64_t bound = peak_live_bytes(p);
  const std::vector<Strategy> all = strategies(p);
  std::vector<Placement> placements = run_strategies(p, all, bound);
  size_t best = 0;  // smallest arena; ties go to the earlier strategy
  for (size_t k = 1; k < placements.size(); ++k) {
    if (placements[k].arena < placements[best].arena) best = k;
  }
  Plan result;
  result.offsets = std::move(placements[best].offsets);
  result.arena_bytes = placements[best].arena;
  result.lower_bound_bytes = bound;
  result.alignment = alignment;
  result.strategy = all[best].name;
  return result;
}

}  // namespace helios::planner
