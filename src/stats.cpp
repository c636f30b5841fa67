#include "src/stats.hpp"

#include <bit>

namespace lazymig {

int Histogram::bucket_of(std::uint64_t ns) noexcept {
    if (ns < kSub) return static_cast<int>(ns);
    const int log = 63 - std::countl_zero(ns);               // >= 4
    const int sub = static_cast<int>((ns >> (log - 4)) & (kSub - 1));
    return (log - 3) * kSub + sub;
}

std::uint64_t Histogram::bucket_high(int b) noexcept {
    if (b < kSub) return static_cast<std::uint64_t>(b);
    const int log = b / kSub + 3;
    const std::uint64_t sub = static_cast<std::uint64_t>(b % kSub);
    return ((kSub + sub + 1) << (log - 4)) - 1;
}

void Histogram::record(std::uint64_t ns) noexcept {
    buckets_[static_cast<std::size_t>(bucket_of(ns))].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(ns, std::memory_order_relaxed);
    auto m = max_.load(std::memory_order_relaxed);
    while (ns > m && !max_.compare_exchange_weak(m, ns, std::memory_order_relaxed)) {
    }
}

LatencySummary Histogram::summary() const noexcept {
    LatencySummary s;
    std::array<std::uint64_t, kBuckets> snap;
    std::uint64_t total = 0;
    for (int i = 0; i < kBuckets; ++i) total += snap[i] = buckets_[i].load(std::memory_order_relaxed);
    s.count = total;
    if (total == 0) return s;
    auto pct = [&](double q) {
        const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total - 1)) + 1;
        std::uint64_t seen = 0;
        for (int i = 0; i < kBuckets; ++i)
            if ((seen += snap[i]) >= rank) return static_cast<double>(bucket_high(i)) / 1000.0;
        return 0.0;
    };
    s.p50_us = pct(0.50);
    s.p99_us = pct(0.99);
    s.p999_us = pct(0.999);
    s.max_us = static_cast<double>(max_.load(std::memory_order_relaxed)) / 1000.0;
    s.mean_us = static_cast<double>(sum_.load(std::memory_order_relaxed)) / 1000.0 / static_cast<double>(total);
    return s;
}

std::vector<LatencyBucket> Histogram::buckets() const {
    std::vector<LatencyBucket> out;
    for (int i = 0; i < kBuckets; ++i)
        if (const auto n = buckets_[i].load(std::memory_order_relaxed); n != 0)
            out.push_back(LatencyBucket{.upper_us = static_cast<double>(bucket_high(i)) / 1000.0, .count = n});
    return out;
}

void Histogram::reset() noexcept {
    for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
    count_ = 0;
    sum_ = 0;
    max_ = 0;
}

}  // namespace lazymig
