// bench/plot.hpp — time series of one benchmarked destination, for `scripts/bench --plot`.
//
// When LAZYMIG_BENCH_PLOT_DIR names a directory, destination_run() keeps a PlotTrace:
// the bench's 10 ms sampler adds lazymig's stats after the VM resumed, and at the end
// two tab-separated files go to that directory, named by the run:
//   timeline-LABEL.tsv  ms since resume, pages present, total pages, bytes received,
//                       MB/s of pages becoming present over the last 50 ms
//   faults-LABEL.tsv    CDF of the touchers' faulting-touch latencies (the guest's view of
//                       a demand fault, what the floor is measured for): µs, fraction
// bench/plot.sh turns them into PNGs. Threads: sample() from the sampler thread only,
// write() after the sampler stopped.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lazymig/lazymig.hpp"

namespace bench {

class PlotTrace {
public:
    // Null unless LAZYMIG_BENCH_PLOT_DIR is set. `label`: "256m-memfd-2touchers".
    [[nodiscard]] static std::unique_ptr<PlotTrace> from_env(std::string label);
    void sample(const lazymig::Stats& st);
    // Writes both files; a failure is printed to stderr with errno (the benchmark's
    // figures do not depend on it) and returns false.
    // `fault_ns`: every recorded faulting touch, any order (none: no faults file).
    bool write(std::vector<std::uint32_t> fault_ns) const;

    static constexpr std::size_t kMaxRows = 100'000;  // 1000 s at 10 ms

private:
    struct Row {
        double ms;
        std::uint64_t present, total, bytes;
    };
    PlotTrace(std::string dir, std::string label) : dir_(std::move(dir)), label_(std::move(label)) {}
    std::string dir_, label_;
    std::uint64_t t0_ns_ = 0;  // the first sample in post-copy
    std::vector<Row> rows_;
};

}  // namespace bench
