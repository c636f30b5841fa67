// source/precopy/decide-*: the switchover policy on made-up round histories.
#include <doctest/doctest.h>

#include "precopy/precopy.hpp"

using namespace lazymig;
using namespace lazymig::source;

namespace {

constexpr double kMBps = 100e6;  // every round moves 100 MB/s

Stats::Round round(std::uint32_t n, std::uint64_t dirty, double ms = 100) {
    Stats::Round r;
    r.round = n;
    r.ms = ms;
    r.bytes_sent = static_cast<std::uint64_t>(kMBps * ms / 1000);
    r.pages_sent = r.bytes_sent / 4096;
    r.bandwidth = kMBps;
    r.dirty_pages = dirty;
    r.dirty_rate = double(dirty) / (ms / 1000);
    return r;
}

Verdict run(Mode m, const Parameters& p, const std::vector<Stats::Round>& h, double elapsed = 0, std::uint64_t sent = 0) {
    return decide(m, p, h, h.back().dirty_pages * 4096, elapsed, sent);
}

}  // namespace

TEST_CASE("source/precopy/decide-converges-within-the-downtime-limit") {
    Parameters p;
    p.downtime_limit_ms = 50;
    // 1000 pages = 4.1 MB = 41 ms at 100 MB/s: within 50 ms.
    auto v = run(Mode::precopy, p, {round(1, 1000)});
    CHECK(v.decision == Decision::converged);
    CHECK(v.why == "converged after round 1: 1000 dirty pages' 4096000 bytes take 41.0 ms at 100.0 MB/s, within the "
                   "50 ms downtime limit");
    // 2000 pages = 82 ms: another round.
    CHECK(run(Mode::precopy, p, {round(1, 2000)}).decision == Decision::next_round);
    // Nothing dirty: done whatever the bandwidth.
    CHECK(run(Mode::hybrid, p, {round(1, 0)}).decision == Decision::converged);
}

TEST_CASE("source/precopy/decide-bounds") {
    Parameters p;
    p.downtime_limit_ms = 1;
    p.max_rounds = 3;
    std::vector<Stats::Round> h{round(1, 5000), round(2, 4000)};
    CHECK(run(Mode::precopy, p, h).decision == Decision::next_round);
    h.push_back(round(3, 3000));
    auto v = run(Mode::precopy, p, h);
    CHECK(v.decision == Decision::bound);
    CHECK(v.why.starts_with("bound: 3 rounds (max_rounds); 12288000 bytes still dirty would take 122.9 ms"));
    p.max_rounds = 0;
    p.max_precopy_bytes = 1000;
    CHECK(run(Mode::precopy, p, h, 0, 999).decision == Decision::next_round);
    CHECK(run(Mode::precopy, p, h, 0, 1000).why.starts_with("bound: 1000 bytes sent (max_precopy_bytes 1000)"));
    p.max_precopy_bytes = 0;
    p.max_precopy_ms = 500;
    CHECK(run(Mode::precopy, p, h, 500).why.starts_with("bound: 500 ms of pre-copy (max_precopy_ms 500)"));
}

TEST_CASE("source/precopy/decide-diverging-only-in-hybrid") {
    Parameters p;
    p.downtime_limit_ms = 1;
    // The guest dirties 40000 pages in 100 ms (1.6 GB/s) against 100 MB/s, twice after round 1.
    std::vector<Stats::Round> h{round(1, 40000), round(2, 40000), round(3, 30000)};
    auto v = run(Mode::hybrid, p, h);
    CHECK(v.decision == Decision::diverging);
    CHECK(v.why.starts_with("diverging: the guest dirties 1228.8 MB/s, the link moves 100.0 MB/s (rounds 2-3)"));
    CHECK(run(Mode::precopy, p, h).decision == Decision::next_round);
    // Slow dirtying, but the set does not shrink over three rounds.
    std::vector<Stats::Round> flat{round(1, 1000, 1000), round(2, 1000, 1000), round(3, 1000, 1000), round(4, 1000, 1000)};
    auto f = run(Mode::hybrid, p, flat);
    CHECK(f.decision == Decision::diverging);
    CHECK(f.why.starts_with("diverging: the dirty set did not shrink over rounds 2-4 (1000, 1000, 1000 pages)"));
    // Shrinking: keep going.
    std::vector<Stats::Round> shrinking{round(1, 1000, 1000), round(2, 900, 1000), round(3, 800, 1000), round(4, 700, 1000)};
    CHECK(run(Mode::hybrid, p, shrinking).decision == Decision::next_round);
}
