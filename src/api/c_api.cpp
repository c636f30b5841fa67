// The C ABI: thin adapters from lazymig.h to the C++ objects. No exception crosses it.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "lazymig/lazymig.h"
#include "lazymig/lazymig.hpp"

struct lazymig_source {
    std::unique_ptr<lazymig::Source> impl;
    // What the setters last gave: each setter changes its own fields only.
    std::mutex mu;
    lazymig::Parameters params;
};
struct lazymig_destination {
    std::unique_ptr<lazymig::Destination> impl;
};

namespace {

thread_local std::string g_last_error;
thread_local int g_last_class = 0;

int c_class(lazymig::ErrorClass k) {
    switch (k) {
    case lazymig::ErrorClass::local: return LAZYMIG_ERROR_LOCAL;
    case lazymig::ErrorClass::transport_lost: return LAZYMIG_ERROR_TRANSPORT_LOST;
    case lazymig::ErrorClass::peer_violation: return LAZYMIG_ERROR_PEER_VIOLATION;
    case lazymig::ErrorClass::invalid: break;
    }
    return LAZYMIG_ERROR_LOCAL;
}

// The errno of the failing call when there was one; otherwise one that says the class:
// a broken link is never reported as EINVAL.
int fail(const lazymig::Error& e) {
    g_last_error = e.message();
    g_last_class = c_class(e.kind);
    if (e.code > 0) return -e.code;
    switch (e.kind) {
    case lazymig::ErrorClass::transport_lost: return -ECONNRESET;
    case lazymig::ErrorClass::peer_violation: return -EPROTO;
    default: return -EINVAL;
    }
}

int fail_text(const char* text, int code = EINVAL) {
    g_last_error = text;
    g_last_class = LAZYMIG_ERROR_LOCAL;
    return -code;
}

// Runs `body`, turning an escaping exception (bad_alloc from a hook's vector, say)
// into -ENOMEM / -EIO with its text.
template <class F>
int guarded(F body) {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return fail_text("out of memory", ENOMEM);
    } catch (const std::exception& e) {
        return fail_text(e.what(), EIO);
    }
}

std::vector<lazymig::GuestRegion> to_regions(const lazymig_region* r, size_t n) {
    std::vector<lazymig::GuestRegion> out;
    for (size_t i = 0; i < n; ++i)
        out.push_back({.name = r[i].name ? r[i].name : "", .host = r[i].host, .size = r[i].size,
                       .page_size = r[i].page_size, .backing = lazymig::Backing(r[i].backing), .fd = r[i].fd,
                       .fd_offset = r[i].fd_offset});
    return out;
}

lazymig::VmmHooks to_hooks(const lazymig_hooks& h) {
    lazymig::VmmHooks v;
    if (h.pause_vcpus) v.pause_vcpus = [h] { h.pause_vcpus(h.ctx); };
    if (h.resume_vcpus) v.resume_vcpus = [h] { h.resume_vcpus(h.ctx); };
    if (h.save_device_state)
        v.save_device_state = [h]() -> lazymig::Result<std::vector<std::byte>> {
            void* buf = nullptr;
            size_t len = 0;
            if (int r = h.save_device_state(h.ctx, &buf, &len); r < 0)
                return lazymig::sys_error("save_device_state hook", -r);
            std::vector<std::byte> out(static_cast<std::byte*>(buf), static_cast<std::byte*>(buf) + len);
            std::free(buf);
            return out;
        };
    if (h.load_device_state)
        v.load_device_state = [h](std::span<const std::byte> b) -> lazymig::Result<void> {
            if (int r = h.load_device_state(h.ctx, b.data(), b.size()); r < 0)
                return lazymig::sys_error("load_device_state hook", -r);
            return {};
        };
    if (h.on_event)
        v.on_event = [h](const lazymig::Event& e) {
            h.on_event(h.ctx, static_cast<int>(e.phase), e.kind == lazymig::Event::Kind::error, e.message.c_str());
        };
    return v;
}

void to_c(const lazymig::Stats& s, lazymig_stats* o) {
    *o = lazymig_stats{};
    o->phase = static_cast<int>(s.phase);
    o->total_pages = s.total_pages;
    o->pages_present = s.pages_present;
    o->pages_pushed = s.pages_pushed;
    o->pages_demanded = s.pages_demanded;
    o->zero_pages = s.zero_pages;
    o->duplicate_pages = s.duplicate_pages;
    o->faults = s.faults;
    o->requests = s.requests;
    o->bytes_sent = s.bytes_sent;
    o->bytes_received = s.bytes_received;
    o->device_state_bytes = s.device_state_bytes;
    o->downtime_ms = s.downtime_ms;
    o->elapsed_ms = s.elapsed_ms;
    o->postcopy_ms = s.postcopy_ms;
    o->fault_p50_us = s.fault_latency.p50_us;
    o->fault_p99_us = s.fault_latency.p99_us;
    o->fault_p999_us = s.fault_latency.p999_us;
    o->fault_max_us = s.fault_latency.max_us;
    o->pages_missing = s.pages_missing;
    o->destination_resumed = s.destination_resumed ? 1 : 0;
    o->blocktime_ms = s.blocktime_ms;
    o->bulk_channels = s.bulk_channels;
}

// "psk-file:PATH", "x509:DIR[:PEERNAME]", "none"; null: the default (a key required).
lazymig::Result<lazymig::Security> parse_auth(const char* spec) {
    if (!spec) return lazymig::Security{};
    const std::string_view s = spec;
    if (s == "none") return lazymig::Security{.auth = lazymig::Auth::none};
    if (s.starts_with("psk-file:"))
        return lazymig::Security{.auth = lazymig::Auth::psk, .psk_file = std::string(s.substr(9))};
    if (s.starts_with("x509:")) {
        std::string_view rest = s.substr(5);
        lazymig::Security sec{.auth = lazymig::Auth::x509};
        const auto colon = rest.find(':');
        sec.creds_dir = std::string(rest.substr(0, colon));
        if (colon != std::string_view::npos) sec.peer_name = std::string(rest.substr(colon + 1));
        return sec;
    }
    return lazymig::logic_error("auth '" + std::string(s) + "': expected psk-file:PATH, x509:DIR[:PEERNAME] or none");
}

}  // namespace

extern "C" {

const char* lazymig_version(void) { return LAZYMIG_VERSION_STRING; }

const char* lazymig_last_error(void) { return g_last_error.c_str(); }

int lazymig_source_create(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks, const char* uri,
                          int mode, lazymig_source** out) {
    return lazymig_source_create_auth(regions, count, hooks, uri, mode, nullptr, out);
}

int lazymig_source_create_auth(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                               const char* uri, int mode, const char* auth, lazymig_source** out) {
    if (!regions || !hooks || !uri || !out) return fail_text("lazymig_source_create: null argument");
    auto sec = parse_auth(auth);
    if (!sec) return fail(sec.error());
    return guarded([&] {
        auto s = lazymig::Source::create({.regions = to_regions(regions, count), .hooks = to_hooks(*hooks),
                                          .uri = uri, .mode = lazymig::Mode(mode), .security = *sec});
        if (!s) return fail(s.error());
        *out = new lazymig_source{std::move(*s)};
        return 0;
    });
}

int lazymig_source_migrate(lazymig_source* src) {
    return guarded([&] {
        auto r = src->impl->migrate();
        return r ? 0 : fail(r.error());
    });
}

int lazymig_source_wait(lazymig_source* src) {
    return guarded([&] {
        auto r = src->impl->wait();
        return r ? 0 : fail(r.error());
    });
}

void lazymig_source_cancel(lazymig_source* src) { src->impl->cancel(); }

int lazymig_last_error_class(void) { return g_last_class; }

int lazymig_source_set_bulk_channels(lazymig_source* src, unsigned channels) {
    if (channels == 0 || channels > 16) return fail_text("lazymig_source_set_bulk_channels: channels must be 1 to 16");
    std::lock_guard lock(src->mu);
    src->params.bulk_channels = channels;
    src->impl->set_parameters(src->params);
    return 0;
}

int lazymig_source_get_precopy(const lazymig_source* src, lazymig_precopy_params* out) {
    if (!src || !out) return fail_text("lazymig_source_get_precopy: null argument");
    auto& s = const_cast<lazymig_source&>(*src);
    std::lock_guard lock(s.mu);
    *out = lazymig_precopy_params{.downtime_limit_ms = s.params.downtime_limit_ms, .max_rounds = s.params.max_rounds,
                                  .max_precopy_bytes = s.params.max_precopy_bytes,
                                  .max_precopy_ms = s.params.max_precopy_ms,
                                  .compression = static_cast<int>(s.params.compression)};
    return 0;
}

int lazymig_source_set_precopy(lazymig_source* src, const lazymig_precopy_params* p) {
    if (!src || !p) return fail_text("lazymig_source_set_precopy: null argument");
    if (!std::isfinite(p->downtime_limit_ms) || p->downtime_limit_ms < 0)
        return fail_text("lazymig_source_set_precopy: downtime_limit_ms must be a finite number >= 0");
    if (p->compression < LAZYMIG_COMPRESSION_OFF || p->compression > LAZYMIG_COMPRESSION_AUTO)
        return fail_text("lazymig_source_set_precopy: compression must be LAZYMIG_COMPRESSION_OFF, _ON or _AUTO");
    std::lock_guard lock(src->mu);
    src->params.downtime_limit_ms = p->downtime_limit_ms;
    src->params.max_rounds = p->max_rounds;
    src->params.max_precopy_bytes = p->max_precopy_bytes;
    src->params.max_precopy_ms = p->max_precopy_ms;
    src->params.compression = static_cast<lazymig::Compression>(p->compression);
    src->impl->set_parameters(src->params);
    return 0;
}

int lazymig_source_precopy_stats(const lazymig_source* src, uint32_t* rounds, uint64_t* pages_resent,
                                 uint64_t* stale_pages, char* why, size_t len) {
    return guarded([&] {
        const auto s = src->impl->stats();
        if (rounds) *rounds = static_cast<uint32_t>(s.rounds.size());
        if (pages_resent) *pages_resent = s.pages_resent;
        if (stale_pages) *stale_pages = s.stale_pages;
        if (why && len) {
            const std::size_t n = std::min(len - 1, s.switchover.size());
            std::memcpy(why, s.switchover.data(), n);
            why[n] = '\0';
        }
        return 0;
    });
}

int lazymig_destination_set_vcpu_threads(lazymig_destination* dst, const int* tids, const char* const* names,
                                         size_t count) {
    return guarded([&] {
        std::vector<lazymig::VcpuThread> v;
        for (size_t i = 0; i < count; ++i)
            v.push_back({.tid = tids[i], .name = names && names[i] ? names[i] : ""});
        dst->impl->set_vcpu_threads(std::move(v));
        return 0;
    });
}

int lazymig_source_set_max_bandwidth(lazymig_source* src, uint64_t bps) {
    std::lock_guard lock(src->mu);
    src->params.max_bandwidth = bps;
    src->impl->set_parameters(src->params);
    return 0;
}

int lazymig_source_stats(const lazymig_source* src, lazymig_stats* out) {
    return guarded([&] {
        to_c(src->impl->stats(), out);
        return 0;
    });
}

void lazymig_source_destroy(lazymig_source* src) { delete src; }

int lazymig_destination_listen(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                               const char* uri, lazymig_destination** out) {
    return lazymig_destination_listen_auth(regions, count, hooks, uri, nullptr, out);
}

int lazymig_destination_listen_auth(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                                    const char* uri, const char* auth, lazymig_destination** out) {
    if (!regions || !hooks || !uri || !out) return fail_text("lazymig_destination_listen: null argument");
    auto sec = parse_auth(auth);
    if (!sec) return fail(sec.error());
    return guarded([&] {
        auto d = lazymig::Destination::listen(
            {.regions = to_regions(regions, count), .hooks = to_hooks(*hooks), .uri = uri, .security = *sec});
        if (!d) return fail(d.error());
        *out = new lazymig_destination{std::move(*d)};
        return 0;
    });
}

int lazymig_destination_local_uri(const lazymig_destination* dst, char* buf, size_t len) {
    return guarded([&] {
        const auto uri = dst->impl->local_uri();
        if (uri.size() + 1 > len) return fail_text("lazymig_destination_local_uri: buffer too small", ENOSPC);
        std::memcpy(buf, uri.c_str(), uri.size() + 1);
        return 0;
    });
}

int lazymig_destination_wait(lazymig_destination* dst) {
    return guarded([&] {
        auto r = dst->impl->wait();
        return r ? 0 : fail(r.error());
    });
}

void lazymig_destination_cancel(lazymig_destination* dst) { dst->impl->cancel(); }

int lazymig_destination_stats(const lazymig_destination* dst, lazymig_stats* out) {
    return guarded([&] {
        to_c(dst->impl->stats(), out);
        return 0;
    });
}

void lazymig_destination_destroy(lazymig_destination* dst) { delete dst; }

int lazymig_destination_listen_uffd(int uffd, const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                                    const char* uri, const char* auth, lazymig_destination** out) {
    if (!regions || !hooks || !uri || !out) {
        if (uffd >= 0) ::close(uffd);
        return fail_text("lazymig_destination_listen_uffd: null argument");
    }
    auto sec = parse_auth(auth);
    if (!sec) {
        if (uffd >= 0) ::close(uffd);
        return fail(sec.error());
    }
    return guarded([&] {
        auto d = lazymig::Destination::listen({.regions = to_regions(regions, count), .hooks = to_hooks(*hooks),
                                               .uri = uri, .uffd = uffd, .security = *sec});
        if (!d) return fail(d.error());
        *out = new lazymig_destination{std::move(*d)};
        return 0;
    });
}

int lazymig_source_pause(lazymig_source* src) {
    return guarded([&] {
        auto r = src->impl->pause();
        return r ? 0 : fail(r.error());
    });
}

int lazymig_source_recover(lazymig_source* src, const char* uri) {
    if (!uri) return fail_text("lazymig_source_recover: null uri");
    return guarded([&] {
        auto r = src->impl->recover(uri);
        return r ? 0 : fail(r.error());
    });
}

int lazymig_destination_pause(lazymig_destination* dst) {
    return guarded([&] {
        auto r = dst->impl->pause();
        return r ? 0 : fail(r.error());
    });
}

int lazymig_destination_recover(lazymig_destination* dst, const char* uri) {
    if (!uri) return fail_text("lazymig_destination_recover: null uri");
    return guarded([&] {
        auto r = dst->impl->recover(uri);
        return r ? 0 : fail(r.error());
    });
}

int lazymig_source_set_recover_timeout(lazymig_source* src, uint32_t ms) {
    if (ms == 0) return fail_text("lazymig_source_set_recover_timeout: the timeout must be positive");
    std::lock_guard lock(src->mu);
    src->params.recover_timeout = std::chrono::milliseconds(ms);
    src->impl->set_parameters(src->params);
    return 0;
}

int lazymig_destination_listen_recoverable(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                                           const char* uri, const char* auth, uint32_t recover_timeout_ms,
                                           int poison_on_loss, lazymig_destination** out) {
    if (!regions || !hooks || !uri || !out) return fail_text("lazymig_destination_listen_recoverable: null argument");
    auto sec = parse_auth(auth);
    if (!sec) return fail(sec.error());
    return guarded([&] {
        lazymig::Parameters params;
        if (recover_timeout_ms) params.recover_timeout = std::chrono::milliseconds(recover_timeout_ms);
        auto d = lazymig::Destination::listen({.regions = to_regions(regions, count), .hooks = to_hooks(*hooks),
                                               .uri = uri, .parameters = params, .security = *sec,
                                               .poison_on_loss = poison_on_loss != 0});
        if (!d) return fail(d.error());
        *out = new lazymig_destination{std::move(*d)};
        return 0;
    });
}

namespace {
void to_c_recovery(const lazymig::Stats& s, lazymig_recovery_stats* o) {
    *o = lazymig_recovery_stats{.pauses = s.pauses, .recoveries = s.recoveries,
                                .pages_lost_in_flight = s.pages_lost_in_flight, .refused_resumes = s.refused_resumes,
                                .pages_poisoned = s.pages_poisoned, .vm_stopped = s.vm_stopped ? 1 : 0};
}
}  // namespace

int lazymig_source_recovery_stats(const lazymig_source* src, lazymig_recovery_stats* out) {
    if (!out) return fail_text("lazymig_source_recovery_stats: null argument");
    return guarded([&] {
        to_c_recovery(src->impl->stats(), out);
        return 0;
    });
}

int lazymig_destination_recovery_stats(const lazymig_destination* dst, lazymig_recovery_stats* out) {
    if (!out) return fail_text("lazymig_destination_recovery_stats: null argument");
    return guarded([&] {
        to_c_recovery(dst->impl->stats(), out);
        return 0;
    });
}

}  // extern "C"

int lazymig_destination_listen_hybrid(const lazymig_region* regions, size_t count, const lazymig_hooks* hooks,
                                      const char* uri, const char* auth, uint32_t recover_timeout_ms,
                                      int poison_on_loss, uint32_t epoch_ms, uint32_t lease_ms,
                                      void (*on_committed)(void* ctx, uint64_t epoch), lazymig_destination** out) {
    if (!regions || !hooks || !uri || !out) return fail_text("lazymig_destination_listen_hybrid: null argument");
    auto sec = parse_auth(auth);
    if (!sec) return fail(sec.error());
    return guarded([&] {
        lazymig::Parameters params;
        if (recover_timeout_ms) params.recover_timeout = std::chrono::milliseconds(recover_timeout_ms);
        params.epoch_ms = epoch_ms;
        if (lease_ms) params.lease_ms = lease_ms;
        auto h = to_hooks(*hooks);
        if (on_committed) h.on_epoch_committed = [on_committed, ctx = hooks->ctx](std::uint64_t n) { on_committed(ctx, n); };
        auto d = lazymig::Destination::listen({.regions = to_regions(regions, count), .hooks = std::move(h),
                                               .uri = uri, .parameters = params, .security = *sec,
                                               .poison_on_loss = poison_on_loss != 0});
        if (!d) return fail(d.error());
        *out = new lazymig_destination{std::move(*d)};
        return 0;
    });
}

uint64_t lazymig_destination_open_epoch(const lazymig_destination* dst) {
    return dst ? dst->impl->open_epoch() : 0;
}

int lazymig_source_set_replication(lazymig_source* src, uint32_t epoch_ms, uint32_t lease_ms) {
    if (!src) return fail_text("lazymig_source_set_replication: null argument");
    std::lock_guard lock(src->mu);
    src->params.epoch_ms = epoch_ms;
    if (lease_ms) src->params.lease_ms = lease_ms;
    src->impl->set_parameters(src->params);
    return 0;
}

namespace {
void to_c_replication(const lazymig::Stats& s, lazymig_replication_stats* o) {
    *o = lazymig_replication_stats{.epochs = s.epochs, .epochs_committed = s.epochs_committed,
                                   .epoch_pages = s.epoch_pages, .epoch_overflows = s.epoch_overflows,
                                   .pause_p50_us = s.epoch_pause.p50_us, .pause_p99_us = s.epoch_pause.p99_us,
                                   .pause_max_us = s.epoch_pause.max_us, .commit_p50_us = s.epoch_commit.p50_us,
                                   .commit_p99_us = s.epoch_commit.p99_us, .fenced = s.fenced ? 1 : 0,
                                   .resumed_on_source = s.resumed_on_source ? 1 : 0,
                                   .resumed_from_epoch = s.resumed_from_epoch};
}
}  // namespace

int lazymig_source_replication_stats(const lazymig_source* src, lazymig_replication_stats* out) {
    if (!src || !out) return fail_text("lazymig_source_replication_stats: null argument");
    return guarded([&] {
        to_c_replication(src->impl->stats(), out);
        return 0;
    });
}

int lazymig_destination_replication_stats(const lazymig_destination* dst, lazymig_replication_stats* out) {
    if (!dst || !out) return fail_text("lazymig_destination_replication_stats: null argument");
    return guarded([&] {
        to_c_replication(dst->impl->stats(), out);
        return 0;
    });
}
