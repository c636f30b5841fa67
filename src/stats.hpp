// stats.hpp — lock-free counters and a latency histogram, readable from any thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "lazymig/lazymig.hpp"

namespace lazymig {

// Log-linear buckets over nanoseconds: 16 sub-buckets per power of two, so any
// percentile is within ~6 % of the true value. Recording is one relaxed increment.
class Histogram {
public:
    void record(std::uint64_t ns) noexcept;
    [[nodiscard]] LatencySummary summary() const noexcept;
    // The non-empty buckets, ascending: each counts the values at most upper_us.
    [[nodiscard]] std::vector<LatencyBucket> buckets() const;
    void reset() noexcept;

private:
    static constexpr int kSub = 16;
    static constexpr int kBuckets = 64 * kSub;
    static int bucket_of(std::uint64_t ns) noexcept;
    static std::uint64_t bucket_high(int b) noexcept;
    std::array<std::atomic<std::uint64_t>, kBuckets> buckets_{};
    std::atomic<std::uint64_t> count_{0}, sum_{0}, max_{0};
};

// A relaxed counter; the name says what it counts.
struct Counter {
    std::atomic<std::uint64_t> v{0};
    void add(std::uint64_t n = 1) noexcept { v.fetch_add(n, std::memory_order_relaxed); }
    [[nodiscard]] std::uint64_t get() const noexcept { return v.load(std::memory_order_relaxed); }
};

}  // namespace lazymig
