#include "migration.hpp"

#include <fmt/format.h>

#include "events.hpp"
#include "log.hpp"
#include "vm.hpp"

namespace vmm {

Migration::~Migration() {
    std::lock_guard ctl(ctl_mu_);
    bool running;
    {
        std::lock_guard lock(mu_);
        running = role_ != Role::none && !finished_;
    }
    if (running) {
        log_event("migration_cancel", "reason=shutdown");
        if (source_) source_->cancel();
        if (dest_) dest_->cancel();
    }
    join_waiter();
    source_.reset();
    dest_.reset();
}

void Migration::join_waiter() {
    if (waiter_.joinable()) waiter_.join();
}

namespace {
bool terminal(lazymig::Phase p) {
    return p == lazymig::Phase::completed || p == lazymig::Phase::failed || p == lazymig::Phase::cancelled;
}
const char* role_name(bool source) { return source ? "source" : "destination"; }
}  // namespace

std::string_view qmp_status(lazymig::Phase p) noexcept {
    using lazymig::Phase;
    switch (p) {
    case Phase::idle: return "none";
    case Phase::setup: return "setup";
    case Phase::precopy: return "active";
    case Phase::switchover: return "device";  // vCPUs paused, device state moving
    case Phase::postcopy: return "postcopy-active";
    case Phase::completed: return "completed";
    case Phase::failed: return "failed";
    case Phase::cancelled: return "cancelled";
    case Phase::paused: return "postcopy-paused";
    case Phase::recovering: return "postcopy-recover";
    default: return "none";
    }
}

lazymig::VmmHooks Migration::hooks(Role role) {
    lazymig::VmmHooks h = vm_.hooks();
    if (role == Role::destination) {
        // The vCPUs run from here on: tell lazymig which threads they are, for blocktime.
        h.resume_vcpus = [this, resume = std::move(h.resume_vcpus)] {
            lazymig::Destination* d;
            {
                std::lock_guard lock(mu_);
                d = dest_.get();
            }
            if (d) d->set_vcpu_threads(vm_.vcpu_threads());
            resume();
        };
    }
    h.on_event = [this, role](const lazymig::Event& e) {
        const char* kind = e.kind == lazymig::Event::Kind::error ? "error"
                         : e.kind == lazymig::Event::Kind::phase ? "phase" : "info";
        log_event("migration_event", "kind={} phase={} message=\"{}\"", kind, lazymig::to_string(e.phase), e.message);
        const bool phase_change = e.kind == lazymig::Event::Kind::phase && !terminal(e.phase);
        // Post-copy: once the destination runs the VM, so does its network.
        if (phase_change && role == Role::source && e.phase == lazymig::Phase::postcopy) vm_.handed_over();
        {
            std::lock_guard lock(mu_);
            last_event_ = e.message;
            if (e.kind == lazymig::Event::Kind::error) last_error_event_ = e.message;
            if (phase_change) last_phase_ = e.phase;
        }
        bool first_pass = false;
        {
            std::lock_guard lock(mu_);
            // QEMU's MIGRATION_PASS: the source starts a pass over guest RAM. lazymig makes
            // one (pre-copy rounds are not reported by its events), starting with the
            // first phase that sends pages.
            if (phase_change && role == Role::source && passes_ == 0 &&
                (e.phase == lazymig::Phase::precopy || e.phase == lazymig::Phase::postcopy))
                first_pass = (passes_ = 1) == 1;
        }
        if (phase_change && events_) {
            events_->emit("MIGRATION", {{"status", qmp_status(e.phase)}});
            if (first_pass) events_->emit("MIGRATION_PASS", {{"pass", 1}});
        }
    };
    if (role == Role::destination) {
        // Output commit: every epoch up to `epoch` is at the source; acks of those go out.
        h.on_epoch_committed = [this](std::uint64_t epoch) {
            log_event("migration_epoch_committed", "epoch={}", epoch);
            vm_.release_output(epoch);
        };
    }
    return h;
}

lazymig::Result<std::string> Migration::listen(const std::string& uri) {
    std::lock_guard ctl(ctl_mu_);
    if (role_ != Role::none) return lazymig::logic_error("this VM already takes part in a migration");
    auto dst = lazymig::Destination::listen({.regions = vm_.regions(), .hooks = hooks(Role::destination), .uri = uri,
                                             .parameters = parameters(), .security = security_,
                                             .poison_on_loss = poison_on_loss_});
    if (!dst) return std::unexpected(dst.error().wrap(fmt::format("incoming migration on {}", uri)));
    {
        std::lock_guard lock(mu_);
        dest_ = std::move(*dst);
        // Output commit: the kv acks the VM produces here belong to the destination's open
        // epoch (0, released at once, unless hybrid mode runs epochs).
        vm_.hold_output([d = dest_.get()] { return d->open_epoch(); });
        role_ = Role::destination;
        incoming_uri_ = dest_->local_uri();
    }
    if (auto w = start_waiter(Role::destination, *dest_); !w) return std::unexpected(w.error().wrap("incoming migration"));
    log_event("migration_listening", "uri={}", incoming_uri_);
    return incoming_uri_;
}

lazymig::Result<void> Migration::migrate(const std::string& uri, lazymig::Mode mode) {
    std::lock_guard ctl(ctl_mu_);
    {
        std::lock_guard lock(mu_);
        if (role_ == Role::destination) return lazymig::logic_error("this VM is the destination of an incoming migration");
        if (role_ == Role::source && !finished_) return lazymig::logic_error("a migration is already in progress");
        if (role_ == Role::source && !error_) return lazymig::logic_error("the VM has already migrated away");
    }
    const std::string status = vm_.status()["status"];
    if (status != "running" && status != "paused")
        return lazymig::logic_error(fmt::format("cannot migrate a VM in state {}", status));
    join_waiter();  // the previous (failed) migration's waiter has returned or is about to
    source_.reset();
    lazymig::SourceConfig cfg{.regions = vm_.regions(), .hooks = hooks(Role::source), .uri = uri, .mode = mode,
                              .parameters = parameters(), .security = security_};
    auto src = lazymig::Source::create(std::move(cfg));
    if (!src) return std::unexpected(src.error().wrap(fmt::format("migrate to {}", uri)));
    {
        // Before migrate(): its threads may report phases at once.
        std::lock_guard lock(mu_);
        last_event_.clear();
        last_error_event_.clear();
        last_phase_ = lazymig::Phase::setup;
        passes_ = 0;
    }
    if (auto started = (*src)->migrate(); !started) return std::unexpected(started.error().wrap(fmt::format("migrate to {}", uri)));
    {
        std::lock_guard lock(mu_);
        source_ = std::move(*src);
        role_ = Role::source;
        finished_ = false;
        error_.reset();
    }
    if (auto w = start_waiter(Role::source, *source_); !w) return std::unexpected(w.error().wrap("migrate"));
    log_event("migration_start", "uri={} mode={}", uri, lazymig::to_string(mode));
    return {};
}

// The thread that waits for `endpoint` and reports its end. A thread that cannot be
// started cancels the migration (without mu_: cancel() joins threads that call our hooks).
template <class Endpoint>
lazymig::Result<void> Migration::start_waiter(Role role, Endpoint& endpoint) {
    try {
        waiter_ = std::thread([this, role, e = &endpoint] {
            auto outcome = e->wait();
            finish(role, std::move(outcome), e->stats());
        });
    } catch (const std::system_error& err) {
        endpoint.cancel();
        return lazymig::sys_error("starting the waiter thread", err.code().value());
    }
    return {};
}

// The object behind wait() outlives this thread: it is destroyed only after a join.
void Migration::finish(Role role, lazymig::Result<void> outcome, const lazymig::Stats& end) {
    const char* who = role_name(role == Role::source);
    lazymig::Phase phase = end.phase;
    if (!outcome) {
        // The error event can say more than wait()'s error (the destination adds how
        // many pages never arrived): report the fuller sentence.
        std::lock_guard lock(mu_);
        if (last_error_event_.size() > outcome.error().message().size())
            outcome = std::unexpected(lazymig::Error{0, last_error_event_});
    }
    if (outcome && role == Role::source) vm_.migrated_away();
    if (outcome) log_event("migration_completed", "role={}", who);
    else log_event("migration_failed", "role={} phase={} error=\"{}\"", who, lazymig::to_string(phase), outcome.error().message());
    if (outcome) phase = lazymig::Phase::completed;
    else if (!terminal(phase)) phase = lazymig::Phase::failed;
    {
        std::lock_guard lock(mu_);
        finished_ = true;
        if (!outcome) error_ = outcome.error();
    }
    if (events_) {
        // As QEMU's, the event carries the status only; query-migrate has the error.
        events_->emit("MIGRATION", {{"status", qmp_status(phase)}});
    }
}

// The session of the migration in progress (exactly one of the two is set). REQUIRES:
// ctl_mu_ held, so that it stays until the caller is done with it.
lazymig::Result<std::pair<lazymig::Source*, lazymig::Destination*>> Migration::in_progress() {
    std::lock_guard lock(mu_);
    if (role_ == Role::none || finished_) return lazymig::logic_error("no migration in progress");
    return std::pair{source_.get(), dest_.get()};
}

lazymig::Result<void> Migration::cancel() {
    std::lock_guard ctl(ctl_mu_);
    auto running = in_progress();
    if (!running) return std::unexpected(running.error());
    auto [src, dst] = *running;
    // Post-copy: the VM runs on the destination with part of its memory still here;
    // cancelling would lose it on both sides (QEMU refuses it too).
    const auto phase = src ? src->stats().phase : dst->stats().phase;
    if (phase == lazymig::Phase::postcopy || phase == lazymig::Phase::paused || phase == lazymig::Phase::recovering)
        return lazymig::logic_error("migrate-cancel is refused during post-copy: the VM runs on the destination and "
                                    "part of its memory is only here, so cancelling would lose it; use "
                                    "migrate-pause to stop the transfer and recover later");
    // Without mu_: cancel() joins lazymig's threads, which may call our hooks.
    log_event("migration_cancel", "reason=requested");
    if (src) src->cancel();
    if (dst) dst->cancel();
    return {};
}

lazymig::Result<void> Migration::pause() {
    std::lock_guard ctl(ctl_mu_);
    auto running = in_progress();
    if (!running) return std::unexpected(running.error());
    auto [src, dst] = *running;
    log_event("migration_pause", "role={}", src ? "source" : "destination");
    return src ? src->pause() : dst->pause();
}

lazymig::Result<std::string> Migration::recover(const std::string& uri) {
    std::lock_guard ctl(ctl_mu_);
    auto running = in_progress();
    if (!running) return std::unexpected(running.error());
    auto [src, dst] = *running;
    if (src) {
        if (auto r = src->recover(uri); !r) return std::unexpected(r.error());
        log_event("migration_recover", "role=source uri={}", uri);
        return uri;
    }
    if (auto r = dst->recover(uri); !r) return std::unexpected(r.error());
    const std::string bound = dst->local_uri();
    {
        std::lock_guard lock(mu_);
        incoming_uri_ = bound;
    }
    log_event("migration_recover", "role=destination uri={}", bound);
    return bound;
}

lazymig::Result<void> Migration::set_parameters(const ParameterUpdate& u) {
    if (u.push_batch_pages && (*u.push_batch_pages == 0 || *u.push_batch_pages > 65536))
        return lazymig::logic_error("push-batch-pages must be 1..65536");
    if (u.prefetch_pages && *u.prefetch_pages > 65536) return lazymig::logic_error("prefetch-pages must be 0..65536");
    if (u.bulk_channels && (*u.bulk_channels == 0 || *u.bulk_channels > 16))
        return lazymig::logic_error("bulk-channels must be 1..16");
    std::lock_guard ctl(ctl_mu_);
    lazymig::Source* src;
    lazymig::Destination* dst;
    lazymig::Parameters p;
    {
        std::lock_guard lock(mu_);
        if (u.max_bandwidth) params_.max_bandwidth = *u.max_bandwidth;
        if (u.push_batch_pages) params_.push_batch_pages = *u.push_batch_pages;
        if (u.prefetch_pages) params_.prefetch_pages = *u.prefetch_pages;
        if (u.downtime_limit_ms) params_.downtime_limit_ms = *u.downtime_limit_ms;
        if (u.max_rounds) params_.max_rounds = *u.max_rounds;
        if (u.max_precopy_ms) params_.max_precopy_ms = *u.max_precopy_ms;
        if (u.max_precopy_bytes) params_.max_precopy_bytes = *u.max_precopy_bytes;
        if (u.compression) params_.compression = *u.compression;
        if (u.bulk_channels) {
            if (source_ && !finished_)
                return lazymig::logic_error("bulk-channels cannot change while a migration runs");
            params_.bulk_channels = *u.bulk_channels;
        }
        p = params_;
        src = finished_ ? nullptr : source_.get();
        dst = finished_ ? nullptr : dest_.get();
    }
    if (src) src->set_parameters(p);
    if (dst) dst->set_parameters(p);
    log_event("migration_parameters",
              "max_bandwidth={} push_batch_pages={} prefetch_pages={} bulk_channels={} downtime_limit_ms={} max_rounds={} "
              "max_precopy_bytes={} max_precopy_ms={}",
              p.max_bandwidth, p.push_batch_pages, p.prefetch_pages, p.bulk_channels, p.downtime_limit_ms, p.max_rounds,
              p.max_precopy_bytes, p.max_precopy_ms);
    return {};
}

lazymig::Parameters Migration::parameters() const {
    std::lock_guard lock(mu_);
    return params_;
}

std::optional<std::string> Migration::incoming_uri() const {
    std::lock_guard lock(mu_);
    if (role_ != Role::destination) return std::nullopt;
    return incoming_uri_;
}

nlohmann::json Migration::query() const {
    std::lock_guard ctl(ctl_mu_);
    if (!source_ && !dest_) return {{"phase", "none"}, {"status", "none"}, {"role", "none"}};
    const lazymig::Stats s = source_ ? source_->stats() : dest_->stats();
    nlohmann::json j;
    lazymig::Phase phase = s.phase;
    Role role;
    {
        std::lock_guard lock(mu_);
        role = role_;
        if (terminal(phase) && !finished_) phase = last_phase_;  // the VM has not acted on it yet
        j["role"] = role_ == Role::source ? "source" : "destination";
        if (error_) j["error"] = error_->message();
        if (!last_event_.empty()) j["last-event"] = last_event_;
    }
    const double secs = s.elapsed_ms / 1000.0;
    const auto bytes = s.bytes_sent + s.bytes_received;
    j["phase"] = std::string(lazymig::to_string(phase));
    j["status"] = std::string(qmp_status(phase));  // QEMU's name for it
    j["mode"] = std::string(lazymig::to_string(s.mode));
    j["pages"] = {{"total", s.total_pages}, {"present", s.pages_present}, {"pushed", s.pages_pushed},
                  {"demanded", s.pages_demanded}, {"zero", s.zero_pages}, {"duplicate", s.duplicate_pages}};
    j["percent-present"] = s.total_pages ? 100.0 * static_cast<double>(s.pages_present) / static_cast<double>(s.total_pages) : 0.0;
    j["faults"] = s.faults;
    j["requests"] = s.requests;
    j["bytes"] = {{"sent", s.bytes_sent}, {"received", s.bytes_received}, {"device-state", s.device_state_bytes}};
    j["throughput-mbps"] = secs > 0 ? static_cast<double>(bytes) / secs / 1e6 : 0.0;
    j["elapsed-ms"] = s.elapsed_ms;
    j["downtime-ms"] = s.downtime_ms;
    j["postcopy-ms"] = s.postcopy_ms;
    const auto& l = s.fault_latency;
    j["fault-latency-us"] = {{"count", l.count}, {"p50", l.p50_us}, {"p99", l.p99_us}, {"p999", l.p999_us},
                             {"max", l.max_us}, {"mean", l.mean_us}};
    auto histogram = nlohmann::json::array();
    for (const auto& b : s.fault_latency_histogram) histogram.push_back({{"le-us", b.upper_us}, {"count", b.count}});
    j["fault-latency-histogram"] = std::move(histogram);
    j["bulk-channels"] = s.bulk_channels;
    if (role == Role::destination) {
        // QEMU's postcopy-blocktime, per vCPU thread as lazymig attributes it.
        j["blocktime-ms"] = s.blocktime_ms;
        auto vcpus = nlohmann::json::array();
        for (const auto& v : s.vcpu_blocktime)
            vcpus.push_back({{"name", v.name}, {"tid", v.tid}, {"faults", v.faults}, {"blocktime-ms", v.blocktime_ms}});
        j["vcpu-blocktime"] = std::move(vcpus);
    }
    if (s.mode == lazymig::Mode::precopy || s.mode == lazymig::Mode::hybrid) {
        // Per pre-copy round (source): what it sent, the bandwidth it measured, what the
        // guest dirtied meanwhile; then the decision and why.
        auto rounds = nlohmann::json::array();
        for (const auto& r : s.rounds)
            rounds.push_back({{"round", r.round}, {"pages-sent", r.pages_sent}, {"zero-pages", r.zero_pages},
                              {"bytes-sent", r.bytes_sent}, {"dirty-pages", r.dirty_pages}, {"ms", r.ms},
                              {"bandwidth-mbps", r.bandwidth / 1e6}, {"dirty-rate-pps", r.dirty_rate},
                              {"compressed-pages", r.compressed_pages}, {"compression-ratio", r.compression_ratio}});
        j["precopy"] = {{"rounds", std::move(rounds)}, {"pages-resent", s.pages_resent}, {"stale-pages", s.stale_pages},
                        {"switchover", s.switchover}, {"dirty-tracking", s.dirty_tracking},
                        {"discard-ms", s.discard_ms}, {"compressed-pages", s.compressed_pages},
                        {"compression-ratio", s.compression_ratio}};
    }
    // Post-copy recovery: pauses, recoveries, and what a lost source left behind.
    j["recovery"] = {{"pauses", s.pauses}, {"recoveries", s.recoveries},
                     {"pages-lost-in-flight", s.pages_lost_in_flight}, {"refused-resumes", s.refused_resumes},
                     {"pages-poisoned", s.pages_poisoned}, {"vm-stopped", s.vm_stopped},
                     {"pages-missing", s.pages_missing}};
    if (s.epochs || s.resumed_on_source || s.fenced) {
        // Back-replication (hybrid): epochs sent/applied, their pause and commit latency.
        auto ms = [](const lazymig::LatencySummary& l) {
            return nlohmann::json{{"count", l.count}, {"p50", l.p50_us / 1e3}, {"p99", l.p99_us / 1e3},
                                  {"max", l.max_us / 1e3}};
        };
        j["replication"] = {{"epochs", s.epochs}, {"committed", s.epochs_committed}, {"pages", s.epoch_pages},
                            {"bytes", s.epoch_bytes}, {"largest-pages", s.epoch_largest_pages},
                            {"overflows", s.epoch_overflows}, {"skipped", s.epochs_skipped},
                            {"pause-ms", ms(s.epoch_pause)}, {"commit-ms", ms(s.epoch_commit)},
                            {"fenced", s.fenced}, {"resumed-on-source", s.resumed_on_source},
                            {"resumed-from-epoch", s.resumed_from_epoch}};
    }
    if (!s.error.empty() && !j.contains("error")) j["error"] = s.error;
    return j;
}

}  // namespace vmm
