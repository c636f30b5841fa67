// bench/report.hpp — the human table and the closing JSON line.
//
// Every figure is printed beside the floor it is judged against and the target ratio
// from DESIGN.md ("Performance targets"); a missed target says MISSED on its line and
// again in the summary. Benchmarks never fail on speed: the exit code only says whether
// every migration completed with correct memory.
#pragma once

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "bench/common.hpp"

namespace bench {

// DESIGN.md targets ("Performance").
inline constexpr double kFaultP50Ratio = 1.2;   // demand fault median ≤ 1.2 × raw peer-served fault (p50)
inline constexpr double kFaultP99Ratio = 3.0;   // demand fault p99 ≤ 3 × the same, pusher at full speed
inline constexpr double kPushRatio = 0.80;      // push ≥ 80 % of the raw kernel-copy pipeline
// Post-copy downtime p99 ≤ 2 ms plus device-state time: judged in series.cpp.
inline constexpr double kOverheadSlack = 2u << 20;  // thread stacks, rings, frame buffers

// A flat JSON object, keys in insertion order.
class Json {
public:
    void num(const std::string& key, double v);
    void boolean(const std::string& key, bool v);
    void str(const std::string& key, const std::string& v);
    [[nodiscard]] std::string dump() const;

private:
    std::vector<std::pair<std::string, std::string>> kv_;
};

// One target check: printed where it is measured and collected for the summary.
struct Check {
    std::string what;   // "push 4g memfd"
    std::string figure; // "2.31 GB/s = 0.58 x floor"
    std::string target; // ">= 0.90 x"
    bool met = false;
};

class Report {
public:
    // Prints "   <label>: <figure>  [target ...: met|MISSED]" and remembers the check.
    void check(const std::string& what, const std::string& figure, const std::string& target, bool met);
    void line(const std::string& s) { std::printf("%s\n", s.c_str()); std::fflush(stdout); }
    void summary() const;
    [[nodiscard]] bool all_met() const;
    Json json;

private:
    std::vector<Check> checks_;
};

[[nodiscard]] std::string mib(double bytes);  // "6.3 MiB"

}  // namespace bench
