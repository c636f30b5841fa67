// migration.hpp — this VM's side of a migration: one lazymig Source (outgoing) or
// Destination (incoming), and the waiter thread that turns its outcome into VM state.
//
// Ownership: Migration owns the lazymig object and the waiter thread (which blocks in
// Source/Destination::wait()). The destructor cancels whatever still runs, then joins
// the waiter, then destroys the lazymig object: after it returns no hook runs again.
// It must be destroyed before the Vm it drives.
//
// query()'s phase turns terminal only after the VM has acted on the outcome (a
// completed source is "postmigrate" by then), so a client never sees the one without
// the other.
//
// Phase rules: a VM is either incoming (listen() at start, never migrate()) or
// outgoing; migrate() is refused while one runs or after one completed, and allowed
// again after a failure or a cancel.
//
// Threads: every member may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "lazymig/lazymig.hpp"

namespace vmm {

class EventBus;
class Vm;

struct ParameterUpdate {
    std::optional<std::uint64_t> max_bandwidth;
    std::optional<std::uint32_t> push_batch_pages;
    std::optional<std::uint32_t> prefetch_pages;
    std::optional<std::uint32_t> bulk_channels;  // before migrate only
    std::optional<std::uint32_t> downtime_limit_ms, max_rounds, max_precopy_ms;
    std::optional<std::uint64_t> max_precopy_bytes;
    std::optional<lazymig::Compression> compression;
};

// QEMU's MigrationStatus string for a lazymig phase ("postcopy-active" for postcopy...),
// used by the MIGRATION event and query-migrate's "status".
[[nodiscard]] std::string_view qmp_status(lazymig::Phase p) noexcept;

class Migration {
public:
    // `events` (may be null) receives a MIGRATION event at every phase change; the
    // terminal one (completed, failed, cancelled) only once the VM has acted on it.
    // `security`: how its channels authenticate (both roles).
    // poison_on_loss, recover_timeout: lazymig's (DestinationConfig, Parameters);
    // epoch_ms and lease_ms: hybrid back-replication (Parameters; both sides agree).
    Migration(Vm& vm, EventBus* events, lazymig::Security security, bool poison_on_loss = false,
              std::chrono::milliseconds recover_timeout = std::chrono::milliseconds(60'000),
              std::uint32_t epoch_ms = 50, std::uint32_t lease_ms = 1000)
        : vm_(vm), events_(events), security_(std::move(security)), poison_on_loss_(poison_on_loss) {
        params_.recover_timeout = recover_timeout;
        params_.epoch_ms = epoch_ms;
        params_.lease_ms = lease_ms;
    }
    ~Migration();
    Migration(const Migration&) = delete;
    Migration& operator=(const Migration&) = delete;

    // Incoming: listens on `uri` ("tcp:HOST:PORT", port 0 allowed); returns the bound uri.
    [[nodiscard]] lazymig::Result<std::string> listen(const std::string& uri);
    // Outgoing: starts migrating to `uri` and returns at once.
    [[nodiscard]] lazymig::Result<void> migrate(const std::string& uri, lazymig::Mode mode);
    [[nodiscard]] lazymig::Result<void> cancel();
    // migrate-pause: post-copy only, either side (lazymig's pause()).
    [[nodiscard]] lazymig::Result<void> pause();
    // migrate-recover: the destination listens again on `uri` (returns the bound uri);
    // the source reconnects to it (returns `uri`).
    [[nodiscard]] lazymig::Result<std::string> recover(const std::string& uri);
    [[nodiscard]] lazymig::Result<void> set_parameters(const ParameterUpdate& update);
    [[nodiscard]] lazymig::Parameters parameters() const;

    [[nodiscard]] nlohmann::json query() const;
    [[nodiscard]] std::optional<std::string> incoming_uri() const;

private:
    enum class Role { none, source, destination };
    [[nodiscard]] lazymig::VmmHooks hooks(Role role);
    void finish(Role role, lazymig::Result<void> outcome, const lazymig::Stats& end);  // on the waiter thread
    void join_waiter();
    [[nodiscard]] lazymig::Result<std::pair<lazymig::Source*, lazymig::Destination*>> in_progress();
    template <class Endpoint>
    [[nodiscard]] lazymig::Result<void> start_waiter(Role role, Endpoint& endpoint);

    Vm& vm_;
    EventBus* const events_;
    // Lock order: ctl_mu_ → lazymig's own locks → mu_. ctl_mu_ serialises the calls
    // that use or replace the lazymig object; mu_ guards the fields below and is
    // never held across a lazymig call (hooks take it from lazymig's threads).
    mutable std::mutex ctl_mu_;
    mutable std::mutex mu_;
    lazymig::Parameters params_{};
    Role role_ = Role::none;
    bool finished_ = false;              // the waiter has seen wait() return
    std::optional<lazymig::Error> error_;  // why the last migration ended, if it failed
    std::string last_event_;
    lazymig::Security security_;
    bool poison_on_loss_ = false;
    std::string last_error_event_;       // the sentence lazymig ended with, if it failed
    lazymig::Phase last_phase_ = lazymig::Phase::setup;  // the last phase before the end
    std::uint32_t passes_ = 0;           // MIGRATION_PASS events sent for this migration
    std::string incoming_uri_;
    std::unique_ptr<lazymig::Source> source_;
    std::unique_ptr<lazymig::Destination> dest_;
    std::thread waiter_;
};

}  // namespace vmm
