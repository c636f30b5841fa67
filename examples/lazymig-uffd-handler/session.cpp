#include "session.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include <fmt/format.h>

namespace uffd_handler {
namespace {

using lazymig::Result;

// The VMM's vCPUs run on whatever the VMM does; the handler has none to pause.
lazymig::VmmHooks no_vcpus() {
    lazymig::VmmHooks h;
    h.pause_vcpus = [] {};
    h.resume_vcpus = [] {};
    h.save_device_state = [] { return Result<std::vector<std::byte>>(std::vector<std::byte>{}); };
    return h;
}

Result<void> pread_all(int fd, std::uint64_t offset, std::span<std::byte> dst) {
    for (std::size_t done = 0; done < dst.size();) {
        const ssize_t n = ::pread(fd, dst.data() + done, dst.size() - done, static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return lazymig::sys_error(fmt::format("snapshot file: pread {} bytes at {}", dst.size() - done, offset + done));
        if (n == 0)
            return std::unexpected(lazymig::Error{EIO, fmt::format("snapshot file: ends before byte {}", offset + done)});
        done += static_cast<std::size_t>(n);
    }
    return {};
}

}  // namespace

nlohmann::json stats_json(const lazymig::Stats& s) {
    nlohmann::json j{{"phase", std::string(lazymig::to_string(s.phase))},
                     {"total_pages", s.total_pages},
                     {"pages_present", s.pages_present},
                     {"pages_pushed", s.pages_pushed},
                     {"pages_demanded", s.pages_demanded},
                     {"pages_removed", s.pages_removed},
                     {"zero_pages", s.zero_pages},
                     {"faults", s.faults},
                     {"requests", s.requests},
                     {"fault_p50_us", s.fault_latency.p50_us},
                     {"fault_p99_us", s.fault_latency.p99_us},
                     {"fault_max_us", s.fault_latency.max_us},
                     {"blocktime_ms", s.blocktime_ms},
                     {"elapsed_ms", s.elapsed_ms},
                     {"bytes_received", s.bytes_received}};
    return j;
}

std::string Summary::line() const {
    return fmt::format("session {} (pid {}) {}{}{}: pages present {}/{}, removed {}, faults {} (p50 {:.0f} us, p99 {:.0f} us), "
                       "demanded {}, pushed {}, {:.1f} ms",
                       number, pid, outcome, error.empty() ? "" : ": ", error, stats.pages_present, stats.total_pages,
                       stats.pages_removed, stats.faults, stats.fault_latency.p50_us, stats.fault_latency.p99_us,
                       stats.pages_demanded, stats.pages_pushed, stats.elapsed_ms);
}

nlohmann::json Summary::to_json() const {
    return {{"session", number}, {"pid", pid}, {"outcome", outcome}, {"error", error}, {"stats", stats_json(stats)}};
}

Summary serve(unsigned number, Handshake h, const SourceSpec& spec, int conn, std::array<int, 2> stop_fds,
              const Live& live) {
    Summary sum{.number = number, .pid = h.pid};
    auto fail = [&](std::string outcome, const std::string& why) {
        sum.outcome = std::move(outcome);
        sum.error = why;
        return sum;
    };
    std::vector<lazymig::GuestRegion> regions;
    for (std::size_t i = 0; i < h.mappings.size(); ++i) {
        const Mapping& m = h.mappings[i];
        if (spec.snapshot_fd >= 0 && (m.offset > spec.snapshot_size || m.size > spec.snapshot_size - m.offset))
            return fail("refused", fmt::format("mapping {} needs bytes [{}, {}) of the snapshot file, which has {}", i,
                                               m.offset, m.offset + m.size, spec.snapshot_size));
        regions.push_back({.name = fmt::format("ram{}", i), .host = reinterpret_cast<void*>(m.base), .size = m.size,
                           .page_size = m.page_size,
                           .backing = m.page_size == 4096 ? lazymig::Backing::anon : lazymig::Backing::hugetlbfs});
    }
    const bool local = spec.snapshot_fd >= 0;
    // The snapshot's Source and the Destination meet on loopback, where any local process
    // could connect: a key made for this session alone authenticates them.
    lazymig::Security security = spec.security;
    if (local) {
        std::vector<std::byte> key(32);
        if (::getrandom(key.data(), key.size(), 0) != static_cast<ssize_t>(key.size()))
            return fail("failed", fmt::format("getrandom: {}", std::strerror(errno)));
        security = {.auth = lazymig::Auth::psk, .psk = std::move(key)};
    }
    auto dst = lazymig::Destination::listen({.regions = regions, .hooks = no_vcpus(),
                                             .uri = local ? "tcp:127.0.0.1:0" : spec.listen_uri,
                                             .parameters = spec.parameters, .uffd = h.uffd.release(),
                                             .security = security});
    if (!dst) return fail("refused", dst.error().message());
    live.publish(dst->get(), (*dst)->local_uri());

    std::unique_ptr<lazymig::Source> src;
    if (local) {
        std::vector<std::uint64_t> offsets;
        for (const auto& m : h.mappings) offsets.push_back(m.offset);
        lazymig::Parameters p = spec.parameters;
        p.bulk_channels = 1;  // one pusher: the fill competes with the VM's vCPUs for cores
        auto s = lazymig::Source::create(
            {.regions = regions, .hooks = no_vcpus(),
             .read_pages = [fd = spec.snapshot_fd, offsets](std::uint32_t r, std::uint64_t off, std::span<std::byte> d) {
                 return pread_all(fd, offsets[r] + off, d);
             },
             .uri = (*dst)->local_uri(), .mode = lazymig::Mode::postcopy, .parameters = p, .security = security});
        Result<void> started = s ? (*s)->migrate() : Result<void>(std::unexpected(s.error()));
        if (!started) {
            (*dst)->cancel();
            live.publish(nullptr, {});
            return fail("failed", started.error().wrap("snapshot file source").message());
        }
        src = std::move(*s);
    }

    // The Destination ends by itself (complete or failed); the VMM's hangup or a stop ends it early.
    const int done = ::eventfd(0, EFD_CLOEXEC);
    if (done < 0) {
        (*dst)->cancel();
        live.publish(nullptr, {});
        return fail("failed", fmt::format("eventfd: {}", std::strerror(errno)));
    }
    Result<void> outcome;
    std::thread waiter([&] {
        outcome = (*dst)->wait();
        const std::uint64_t one = 1;
        (void)!::write(done, &one, sizeof one);
    });
    std::string ended_by;
    for (;;) {
        pollfd fds[4] = {{done, POLLIN, 0}, {conn, POLLRDHUP, 0}, {stop_fds[0], POLLIN, 0}, {stop_fds[1], POLLIN, 0}};
        const int n = ::poll(fds, 4, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        if (fds[1].revents) {  // before `done`: placement into an exited VMM fails (ESRCH)
            ended_by = "vmm-exited";
            break;
        }
        if (fds[0].revents) {
            pollfd c{conn, POLLRDHUP, 0};
            if (::poll(&c, 1, 0) == 1) ended_by = "vmm-exited";
            break;
        }
        if (fds[2].revents || fds[3].revents) {
            ended_by = "stopped";
            break;
        }
    }
    if (!ended_by.empty()) (*dst)->cancel();
    waiter.join();
    ::close(done);
    if (src) src->cancel();
    sum.stats = (*dst)->stats();
    live.publish(nullptr, {});
    if (ended_by == "vmm-exited" && sum.stats.phase != lazymig::Phase::completed)
        return fail(ended_by, "the VMM closed its connection (it exited) before every page was present");
    if (ended_by == "stopped" && sum.stats.phase != lazymig::Phase::completed)
        return fail(ended_by, "the handler was asked to stop");
    if (!outcome) return fail("failed", outcome.error().message());
    sum.outcome = "completed";
    return sum;
}

}  // namespace uffd_handler
