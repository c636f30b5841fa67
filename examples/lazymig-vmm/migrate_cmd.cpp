// `lazymig-vmm migrate`: drives a migration through the two management sockets, shows
// live progress, then a summary. Exit code 0 only when the migration completed and
// (with --dest-qmp) the destination's workload checks out.
#include <unistd.h>

#include <cerrno>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>

#include <fmt/format.h>

#include "options.hpp"
#include "qmp_client.hpp"

namespace vmm {

namespace {
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

bool terminal(const std::string& phase) { return phase == "completed" || phase == "failed" || phase == "cancelled"; }

std::uint64_t u64(const json& j, const char* a, const char* b = nullptr) {
    const json* p = &j;
    if (!p->contains(a)) return 0;
    p = &(*p)[a];
    if (b) {
        if (!p->contains(b)) return 0;
        p = &(*p)[b];
    }
    return p->is_number() ? p->get<std::uint64_t>() : 0;
}
double num(const json& j, const char* a, const char* b = nullptr) {
    const json* p = &j;
    if (!p->contains(a)) return 0;
    p = &(*p)[a];
    if (b) {
        if (!p->contains(b)) return 0;
        p = &(*p)[b];
    }
    return p->is_number() ? p->get<double>() : 0;
}

// At most 10 minutes of 100 ms samples in a --report file.
constexpr std::size_t kMaxReportSamples = 6000;

struct Sample {
    Clock::time_point at;
    std::uint64_t bytes = 0, faults = 0;
};

void print_summary(const MigrateOptions& o, const json& src, const std::optional<json>& dst,
                   const std::optional<json>& check, double wall_ms) {
    const json& d = dst ? *dst : src;  // figures measured on the destination when we have it
    const double secs = num(src, "elapsed-ms") / 1000;
    const std::uint64_t bytes = u64(src, "bytes", "sent");
    auto row = [](std::string_view k, const std::string& v) { fmt::print("  {:<22}{}\n", k, v); };
    fmt::print("\nmigration summary\n");
    row("mode", std::string(lazymig::to_string(o.mode)));
    row("result", src.value("phase", "?") + (src.contains("error") ? " (" + src["error"].get<std::string>() + ")" : ""));
    row("total time", fmt::format("{:.1f} ms (wall {:.1f} ms)", num(src, "elapsed-ms"), wall_ms));
    row("downtime", fmt::format("{:.2f} ms", std::max(num(src, "downtime-ms"), num(d, "downtime-ms"))));
    row("pages total", fmt::format("{}", u64(src, "pages", "total")));
    row("pages pushed", fmt::format("{}", u64(src, "pages", "pushed")));
    row("pages demanded", fmt::format("{}", u64(src, "pages", "demanded")));
    row("zero pages", fmt::format("{}", u64(src, "pages", "zero")));
    row("bytes sent", fmt::format("{:.1f} MB", static_cast<double>(bytes) / 1e6));
    row("throughput", fmt::format("{:.1f} MB/s", secs > 0 ? static_cast<double>(bytes) / 1e6 / secs : 0.0));
    row("bulk channels", fmt::format("{}", u64(src, "bulk-channels")));
    if (src.contains("precopy")) {
        const json& p = src["precopy"];
        row("dirty tracking", p.value("dirty-tracking", "?"));
        row("pre-copy rounds", fmt::format("{}", p["rounds"].size()));
        for (const auto& r : p["rounds"])
            row(fmt::format("  round {}", r.value("round", 0u)),
                fmt::format("{} pages ({} zero, {} lz4 {:.2f}x), {:.1f} MB in {:.1f} ms, {:.1f} MB/s, {} dirtied ({:.0f} pages/s)",
                            r.value("pages-sent", 0ull), r.value("zero-pages", 0ull), r.value("compressed-pages", 0ull),
                            r.value("compression-ratio", 0.0), r.value("bytes-sent", 0ull) / 1e6,
                            r.value("ms", 0.0), r.value("bandwidth-mbps", 0.0), r.value("dirty-pages", 0ull),
                            r.value("dirty-rate-pps", 0.0)));
        row("pages sent again", fmt::format("{}", p.value("pages-resent", 0ull)));
        row("lz4 compressed", fmt::format("{} pages, ratio {:.2f}", p.value("compressed-pages", 0ull),
                                          p.value("compression-ratio", 0.0)));
        row("stale pages", fmt::format("{}", p.value("stale-pages", 0ull)));
        if (dst && d.contains("precopy")) row("stale discard", fmt::format("{:.2f} ms", d["precopy"].value("discard-ms", 0.0)));
        row("switchover", p.value("switchover", ""));
    }
    if (dst) {
        row("faults (destination)", fmt::format("{}", u64(d, "faults")));
        row("fault latency p50", fmt::format("{:.1f} us", num(d, "fault-latency-us", "p50")));
        row("fault latency p99", fmt::format("{:.1f} us", num(d, "fault-latency-us", "p99")));
        row("blocktime", fmt::format("{:.1f} ms", num(d, "blocktime-ms")));
        if (d.contains("vcpu-blocktime"))
            for (const auto& v : d["vcpu-blocktime"])
                row(fmt::format("  {}", v.value("name", "?")),
                    fmt::format("{:.1f} ms over {} faults", v.value("blocktime-ms", 0.0), v.value("faults", 0ull)));
    }
    if (check) row("check-workload", fmt::format("{} ({})", check->value("ok", false) ? "ok" : "FAILED", check->value("detail", "")));
    std::fflush(stdout);
}

// --report FILE: the timeline the progress line shows, one sample per 100 ms, and the
// final query-migrate of each side. Written whole to FILE.tmp, then renamed, so a
// reader never sees half a file.
bool write_report(const MigrateOptions& o, const json& timeline, const json& src, const std::optional<json>& dst,
                  const std::optional<json>& check) {
    json r{{"from", o.from}, {"mode", lazymig::to_string(o.mode)}, {"interval-ms", 100},
           {"samples", timeline}, {"source", src}, {"destination", dst ? *dst : json(nullptr)},
           {"check-workload", check ? *check : json(nullptr)}};
    const std::string text = r.dump(1) + "\n";
    const std::string tmp = o.report + ".tmp";
    std::FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f) {
        const int e = errno;
        return fmt::print(stderr, "lazymig-vmm migrate: --report {}: {} (errno {})\n", tmp, std::strerror(e), e), false;
    }
    const bool wrote = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    const int e = errno;
    if (std::fclose(f) != 0 || !wrote) {
        const int e2 = wrote ? errno : e;
        return fmt::print(stderr, "lazymig-vmm migrate: writing {}: {} (errno {})\n", tmp, std::strerror(e2), e2), false;
    }
    if (std::rename(tmp.c_str(), o.report.c_str()) != 0) {
        const int e3 = errno;
        return fmt::print(stderr, "lazymig-vmm migrate: rename {} to {}: {} (errno {})\n", tmp, o.report,
                          std::strerror(e3), e3), false;
    }
    fmt::print("report: {} ({} samples)\n", o.report, timeline.size());
    return true;
}

}  // namespace

int run_migrate(const MigrateOptions& o) {
    auto src = QmpClient::connect(o.from);
    if (!src) return fmt::print(stderr, "lazymig-vmm migrate: source: {}\n", src.error().message()), 1;
    std::optional<QmpClient> dst;
    if (!o.dest_qmp.empty()) {
        auto c = QmpClient::connect(o.dest_qmp);
        if (!c) return fmt::print(stderr, "lazymig-vmm migrate: destination: {}\n", c.error().message()), 1;
        dst = std::move(*c);
    }
    std::string uri = o.to;
    if (uri.empty()) {
        auto st = dst->execute("query-status");
        if (!st) return fmt::print(stderr, "lazymig-vmm migrate: {}\n", st.error().message()), 1;
        if (!(*st)["incoming"].is_string()) return fmt::print(stderr, "lazymig-vmm migrate: the destination is not waiting for a migration\n"), 1;
        uri = (*st)["incoming"];
    }
    // Events (every negotiated client gets them) tell when each side is done; the
    // progress line is sampled and redrawn at a display rate between them (4/s on a
    // terminal, one line a second otherwise).
    json params = json::object();
    if (o.bulk_channels) params["bulk-channels"] = o.bulk_channels;
    if (o.max_bandwidth) params["max-bandwidth"] = *o.max_bandwidth;
    if (o.downtime_limit_ms) params["downtime-limit"] = *o.downtime_limit_ms;
    if (o.max_rounds) params["max-rounds"] = *o.max_rounds;
    if (o.max_precopy_bytes) params["max-precopy-bytes"] = *o.max_precopy_bytes;
    if (o.max_precopy_ms) params["max-precopy-ms"] = *o.max_precopy_ms;
    if (!o.compression.empty()) params["compression"] = o.compression;
    if (!params.empty())
        if (auto ok = src->execute("migrate-set-parameters", params); !ok)
            return fmt::print(stderr, "lazymig-vmm migrate: {}\n", ok.error().message()), 1;
    const auto start = Clock::now();
    if (auto ok = src->execute("migrate", {{"uri", uri}, {"mode", lazymig::to_string(o.mode)}}); !ok)
        return fmt::print(stderr, "lazymig-vmm migrate: {}\n", ok.error().message()), 1;
    fmt::print("migrating {} → {} ({})\n", o.from, uri, lazymig::to_string(o.mode));
    std::fflush(stdout);

    const bool tty = ::isatty(STDOUT_FILENO) == 1;
    const auto draw_every = tty ? std::chrono::milliseconds(250) : std::chrono::milliseconds(1000);
    // --report: the same figures, one sample per 100 ms, kept for the JSON file.
    constexpr auto kReportEvery = std::chrono::milliseconds(100);
    const bool reporting = !o.report.empty();
    const auto tick = reporting ? std::min<Clock::duration>(kReportEvery, draw_every) : Clock::duration(draw_every);
    json timeline = json::array();
    Sample last_rec{start};
    auto next_show = start;
    auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.timeout_s));
    Sample last{start};
    json s, d;
    // The last line shows rates over the whole run, not over its last instant.
    auto draw = [&](bool final = false) -> bool {
        if (final) last = Sample{start};
        const bool show = final || Clock::now() >= next_show;
        auto sq = src->execute("query-migrate");
        if (!sq) return fmt::print(stderr, "\nlazymig-vmm migrate: source: {}\n", sq.error().message()), false;
        s = *sq;
        if (dst) {
            auto dq = dst->execute("query-migrate");
            if (!dq) return fmt::print(stderr, "\nlazymig-vmm migrate: destination: {}\n", dq.error().message()), false;
            d = *dq;
        }
        const json& view = dst ? d : s;
        const auto now = Clock::now();
        if (reporting && !final && timeline.size() < kMaxReportSamples) {
            const double rdt = std::chrono::duration<double>(now - last_rec.at).count();
            const Sample rec{now, u64(s, "bytes", "sent"), u64(d, "faults")};
            timeline.push_back({{"elapsed-ms", std::chrono::duration<double, std::milli>(now - start).count()},
                                {"status", view.value("status", "?")},
                                {"phase", view.value("phase", "?")},
                                {"pages-present", u64(view, "pages", "present")},
                                {"pages-total", u64(view, "pages", "total")},
                                {"percent-present", num(view, "percent-present")},
                                {"bytes-sent", rec.bytes},
                                {"faults", rec.faults},
                                {"mbps", rdt > 0 ? double(rec.bytes - std::min(rec.bytes, last_rec.bytes)) / 1e6 / rdt : 0.0},
                                {"faults-per-s", rdt > 0 ? double(rec.faults - std::min(rec.faults, last_rec.faults)) / rdt : 0.0}});
            last_rec = rec;
        }
        if (!show) return true;
        next_show = now + draw_every;
        const double dt = std::chrono::duration<double>(now - last.at).count();
        const Sample cur{now, u64(s, "bytes", "sent"), u64(d, "faults")};
        const double mbps = dt > 0 ? static_cast<double>(cur.bytes - std::min(cur.bytes, last.bytes)) / 1e6 / dt : 0;
        const double fps = dt > 0 ? static_cast<double>(cur.faults - std::min(cur.faults, last.faults)) / dt : 0;
        last = cur;
        std::string line = fmt::format("{:<10} {:6.1f}% present  {:8.1f} MB/s  {:8.0f} faults/s  {}/{} pages",
                                       view.value("phase", "?"), num(view, "percent-present"), mbps, fps,
                                       u64(view, "pages", "present"), u64(view, "pages", "total"));
        if (s.contains("precopy") && !s["precopy"]["rounds"].empty()) {
            const json& r = s["precopy"]["rounds"].back();
            line += fmt::format("  round {} dirty {} ({:.0f} pages/s)", r.value("round", 0u), r.value("dirty-pages", 0ull),
                                r.value("dirty-rate-pps", 0.0));
        }
        if (tty) fmt::print("\r{:<100}", line);
        else fmt::print("{}\n", line);
        std::fflush(stdout);
        return true;
    };
    auto is_end = [](const json& e) { return terminal(e["data"].value("status", "")); };
    bool src_done = false, dst_done = !dst;
    for (auto next_draw = start; !(src_done && dst_done);) {
        auto now = Clock::now();
        if (now >= next_draw) {
            if (!draw()) return 1;
            now = Clock::now();
            // The next sample a tick after this one was taken: on a loaded host a query
            // can take tens of ms, and a fixed schedule would then put samples close.
            next_draw = now + tick;
        }
        if (now > deadline) {
            // A post-copy is never cancelled: the VM runs on the destination and needs
            // every page the source still holds.
            auto q = src->execute("query-migrate");
            const std::string status = q ? q->value("status", "") : "";
            if (status == "postcopy-active" || status == "postcopy-paused") {
                fmt::print("\nlazymig-vmm migrate: no completion within {} s, but post-copy cannot be cancelled "
                           "(the VM runs on the destination): waiting for it to end\n", o.timeout_s);
                deadline = Clock::time_point::max();
                continue;
            }
            fmt::print("\nlazymig-vmm migrate: no completion within {} s: cancelling\n", o.timeout_s);
            [[maybe_unused]] auto c = src->execute("migrate-cancel");
            return 1;
        }
        QmpClient& side = src_done ? *dst : *src;
        const auto until = std::min(next_draw, deadline);
        auto e = side.wait_event("MIGRATION", is_end, std::chrono::duration_cast<std::chrono::milliseconds>(until - now) + std::chrono::milliseconds(1));
        if (!e && e.error().code != ETIMEDOUT)
            return fmt::print(stderr, "\nlazymig-vmm migrate: {}\n", e.error().message()), 1;
        if (!e) continue;
        if (src_done) dst_done = true;
        else src_done = true;
        // A source that failed leaves nothing to wait for at the destination.
        if (&side == &*src && (*e)["data"].value("status", "") != "completed") dst_done = true;
    }
    if (!draw(true)) return 1;
    const double wall_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (tty) fmt::print("\n");
    std::optional<json> check;
    if (dst && d.value("phase", "") == "completed") {
        auto c = dst->execute("check-workload");
        check = c ? *c : json{{"ok", false}, {"detail", c.error().message()}};
    }
    print_summary(o, s, dst ? std::optional<json>(d) : std::nullopt, check, wall_ms);
    if (reporting && !write_report(o, timeline, s, dst ? std::optional<json>(d) : std::nullopt, check)) return 1;
    const bool ok = s.value("phase", "") == "completed" && (!dst || d.value("phase", "") == "completed") &&
                    (!check || check->value("ok", false));
    return ok ? 0 : 1;
}

}  // namespace vmm
