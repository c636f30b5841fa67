// Histogram: percentiles on known data are exact to the bucket (within 1/16 above).
#include <doctest/doctest.h>

#include <memory>

#include "src/stats.hpp"

namespace {

// The bucket's upper bound is reported: never below the true value, at most 1/16 above.
void check_close(double reported_us, double true_us) {
    CAPTURE(true_us);
    CHECK(reported_us >= true_us);
    CHECK(reported_us <= true_us * (1.0 + 1.0 / 16));
}

}  // namespace

TEST_CASE("stats/histogram-empty") {
    auto h = std::make_unique<lazymig::Histogram>();
    const auto s = h->summary();
    CHECK(s.count == 0);
    CHECK(s.p50_us == 0);
    CHECK(s.max_us == 0);
}

TEST_CASE("stats/histogram-percentiles-on-known-data") {
    auto h = std::make_unique<lazymig::Histogram>();
    for (std::uint64_t us = 1000; us >= 1; --us) h->record(us * 1000);  // 1..1000 µs, any order
    const auto s = h->summary();
    CHECK(s.count == 1000);
    check_close(s.p50_us, 500);   // rank floor(0.5 * 999) + 1 = 500
    check_close(s.p99_us, 990);   // rank 990
    check_close(s.p999_us, 999);  // rank 999
    CHECK(s.max_us == doctest::Approx(1000.0));
    CHECK(s.mean_us == doctest::Approx(500.5));
}

TEST_CASE("stats/histogram-small-values-are-exact") {
    auto h = std::make_unique<lazymig::Histogram>();
    for (std::uint64_t ns = 0; ns < 16; ++ns) h->record(ns);
    const auto s = h->summary();
    CHECK(s.count == 16);
    CHECK(s.p50_us == doctest::Approx(0.007));  // rank 8 → 7 ns
    CHECK(s.max_us == doctest::Approx(0.015));
}

TEST_CASE("stats/histogram-skewed-tail") {
    auto h = std::make_unique<lazymig::Histogram>();
    for (int i = 0; i < 990; ++i) h->record(50'000);        // 50 µs
    for (int i = 0; i < 10; ++i) h->record(20'000'000);     // 20 ms
    const auto s = h->summary();
    check_close(s.p50_us, 50);
    check_close(s.p99_us, 50);        // rank 990: the last of the fast ones
    check_close(s.p999_us, 20'000);
    CHECK(s.max_us == doctest::Approx(20'000.0));
}

TEST_CASE("stats/histogram-reset") {
    auto h = std::make_unique<lazymig::Histogram>();
    h->record(123'456);
    h->reset();
    CHECK(h->summary().count == 0);
    h->record(7);
    CHECK(h->summary().count == 1);
    CHECK(h->summary().max_us == doctest::Approx(0.007));
}

TEST_CASE("stats/histogram-huge-values") {
    auto h = std::make_unique<lazymig::Histogram>();
    h->record(~0ull);
    h->record(1ull << 62);
    CHECK(h->summary().count == 2);
}
