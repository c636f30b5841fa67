#include "bench/plot.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "bench/common.hpp"

namespace bench {

std::unique_ptr<PlotTrace> PlotTrace::from_env(std::string label) {
    const char* dir = std::getenv("LAZYMIG_BENCH_PLOT_DIR");
    if (!dir || !*dir) return nullptr;
    return std::unique_ptr<PlotTrace>(new PlotTrace(dir, fmt::format("{}-{}", label, ::getpid())));
}

void PlotTrace::sample(const lazymig::Stats& st) {
    const bool running = st.phase == lazymig::Phase::postcopy || st.phase == lazymig::Phase::completed;
    if (!running || rows_.size() == kMaxRows) return;
    const std::uint64_t t = now_ns();
    if (t0_ns_ == 0) t0_ns_ = t;
    // Completed: one last row, then the curve is flat and adds nothing.
    if (!rows_.empty() && rows_.back().present == st.total_pages) return;
    rows_.push_back({double(t - t0_ns_) / 1e6, st.pages_present, st.total_pages, st.bytes_received});
}

namespace {
bool write_file(const std::string& path, const std::string& text) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (!f) {
        const int e = errno;
        std::fprintf(stderr, "bench: plot data %s: %s (errno %d)\n", path.c_str(), std::strerror(e), e);
        return false;
    }
    const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    const int e = errno;
    if (std::fclose(f) != 0 || !ok) {
        std::fprintf(stderr, "bench: writing %s: %s (errno %d)\n", path.c_str(), std::strerror(e), e);
        return false;
    }
    return true;
}
}  // namespace

bool PlotTrace::write(std::vector<std::uint32_t> fault_ns) const {
    std::string t = fmt::format("# {} ms_since_resume pages_present total_pages bytes_received placed_mbps\n", label_);
    // The rate is of pages becoming present (lazymig's bytes_received is only counted
    // at the end), over a 50 ms window: the 10 ms samples alone are mostly scheduling noise.
    constexpr std::size_t kWindow = 5;
    for (std::size_t i = 0; i < rows_.size(); ++i) {
        const Row& r = rows_[i];
        const Row& b = rows_[i >= kWindow ? i - kWindow : 0];
        const double dt = (r.ms - b.ms) / 1e3;
        const double mbps = dt > 0 ? double((r.present - b.present) * kPage) / dt / 1e6 : 0;
        t += fmt::format("{:.3f}\t{}\t{}\t{}\t{:.1f}\n", r.ms, r.present, r.total, r.bytes, mbps);
    }
    const bool a = write_file(fmt::format("{}/timeline-{}.tsv", dir_, label_), t);
    if (fault_ns.empty()) return a;
    // At most ~2000 points: every k-th sorted sample, and the last (the maximum).
    std::sort(fault_ns.begin(), fault_ns.end());
    const std::size_t n = fault_ns.size(), step = std::max<std::size_t>(1, n / 2000);
    std::string f = fmt::format("# {} faulting_touch_us cumulative_fraction ({} touches)\n", label_, n);
    for (std::size_t i = 0; i < n; i += step)
        f += fmt::format("{:.2f}\t{:.6f}\n", fault_ns[i] / 1e3, double(i + 1) / double(n));
    f += fmt::format("{:.2f}\t1\n", fault_ns.back() / 1e3);
    const bool c = write_file(fmt::format("{}/faults-{}.tsv", dir_, label_), f);
    return a && c;
}

}  // namespace bench
