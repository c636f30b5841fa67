// The destination endpoint: listen, hand over, run post-copy until every page is here.
//
// Threads: the session thread (accepts the channels, handshakes, loads device state,
// resumes the VM, then receives and places the urgent channel's demand replies), one
// receiver per bulk channel, and the pager's fault thread. Two shutdown eventfds: the
// session's `stop_` (cancel(), the destructor, the first fatal error) stops them all;
// the link's `link_.stop` (one per connection generation, signalled too by stop_all())
// ends the waits of that link's channels only. The first error wins. Phases follow
// src/session_phase.hpp.
//
// Pause and recover (post-copy, TCP): the section "Link loss: pause and recover" below,
// the diagram in src/protocol.hpp. The fault thread runs throughout; the bulk receivers
// and the urgent loop end with a link and start again on the next.
//
// Hybrid mode adds the replication channel (opened by the source after the bulk ones)
// and the Replicator's threads (pager/replicator.hpp) from resume to the end: epochs of
// dirtied pages to the source, output commit, the lease.
//
// Every frame the destination sends goes out on the urgent channel through one Outbox
// (src/net/outbox.hpp): PAGE_REQUEST from the fault thread never blocks there; acks,
// RESUMED and COMPLETE from the other threads wait (with a deadline) until sent.

#include <condition_variable>
#include <optional>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "pager/rdma_pull.hpp"
#include "pager/replicator.hpp"
#include "src/api/session.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include "src/net/outbox.hpp"
#include "src/net/rdma.hpp"
#include "src/net/socket.hpp"
#include "src/net/tls.hpp"
#include "src/failpoint.hpp"
#include "src/watchdog.hpp"

namespace lazymig {
namespace {

using Clock = std::chrono::steady_clock;
// How long a small frame may wait for the peer's window, and a bulk channel for its
// connection after the urgent one: past either the link is taken as lost.
constexpr std::chrono::milliseconds kSendTimeout{10'000};
constexpr std::chrono::milliseconds kChannelTimeout{30'000};

class DestinationImpl final : public Destination {
public:
    DestinationImpl(DestinationConfig config, std::unique_ptr<pager::Pager> pager,
                    std::unique_ptr<net::Transport> transport, net::ShutdownEvent stop, net::ShutdownEvent link_stop,
                    std::shared_ptr<net::TlsContext> tls)
        : cfg_(std::move(config)), pager_(std::move(pager)), transport_(std::move(transport)),
          local_uri_(transport_->local_uri()), stop_(std::move(stop)), link_{.stop = std::move(link_stop)},
          tls_(std::move(tls)), state_(cfg_.hooks, "destination") {}

    Result<void> start() {
        pager_->on_complete([this] { maybe_send_complete(); });
        try {
            thread_ = std::thread([this] {
                api::SessionState::current = this;
                session();
            });
        } catch (const std::system_error& e) {
            return sys_error("destination: starting the session thread", e.code().value());
        }
        return {};
    }

    ~DestinationImpl() override {
        stop_all();
        join();
    }

    std::string local_uri() const override {
        std::lock_guard lock(chan_mu_);
        return local_uri_;
    }

    void set_vcpu_threads(std::vector<VcpuThread> threads) override { pager_->set_vcpu_threads(std::move(threads)); }

    Result<void> wait() override {
        if (api::SessionState::current == this)
            return std::unexpected(Error{EDEADLK, "destination: wait() called from a hook on the migration's own thread"});
        join();
        if (auto e = state_.error()) return std::unexpected(*e);
        return {};
    }

    // From a hook on the session's own thread this only requests the stop.
    // While paused: the source is taken as lost (the end of session()).
    void cancel() override {
        end_session(Error{ECANCELED, "destination: migration cancelled"});
        if (api::SessionState::current != this) join();
    }

    Result<void> pause() override {
        if (rdma_ready_.load()) return logic_error(kRdmaNoRecover);
        if (replicator_ready_.load()) return logic_error(kReplicatingNoPause);
        const Phase p = state_.phase();
        if (p != Phase::postcopy && p != Phase::recovering)
            return logic_error(fmt::format("destination: pause() during {}: only a post-copy can pause (before it "
                                           "the source still holds the VM; after it there is nothing to pause)",
                                           to_string(p)));
        fail(Error{ECONNABORTED, "destination: paused on purpose (pause())", ErrorClass::transport_lost});
        return {};
    }

    // Listens here, on the caller's thread, so that a refusal (address in use) is its
    // answer and local_uri() tells the port at once; the session thread accepts.
    Result<void> recover(std::string uri) override {
        if (rdma_ready_.load()) return logic_error(kRdmaNoRecover);
        if (replicator_ready_.load()) return logic_error(kReplicatingNoPause);
        if (net::is_rdma_uri(uri)) return logic_error(kRdmaNoRecover);
        {
            std::lock_guard lock(link_.mu);
            const Phase p = state_.phase();
            if (p != Phase::paused || !link_.down)
                return logic_error(fmt::format("destination: recover() during {}: only a paused post-copy can "
                                               "recover", to_string(p)));
            if (next_transport_) return logic_error("destination: recover() already asked for");
        }
        auto fresh = net::ShutdownEvent::create();
        if (!fresh) return std::unexpected(fresh.error().wrap("destination: recover"));
        auto transport = net::tcp_listener(uri, fresh->fd(), tls_);
        if (!transport) return std::unexpected(transport.error().wrap("destination: recover"));
        std::lock_guard lock(link_.mu);
        if (state_.phase() != Phase::paused || next_transport_ || stop_.signalled())
            return logic_error("destination: recover(): the migration left the paused phase meanwhile");
        {
            std::lock_guard clock(chan_mu_);
            local_uri_ = (*transport)->local_uri();
        }
        next_link_stop_ = std::move(*fresh);
        next_transport_ = std::move(*transport);
        link_.cv.notify_all();
        LZ_LOG(info, "destination_recover_listening", "uri={}", local_uri_);
        return {};
    }

    void set_parameters(const Parameters& p) override { pager_->set_prefetch(p.prefetch_pages); }

    std::uint64_t open_epoch() const override {
        auto* r = replicator_ready_.load(std::memory_order_acquire);
        // Between resume_vcpus() and the replicator's start the VM already runs here:
        // its output belongs to the first epoch, not to none.
        return r ? r->open_epoch() : first_epoch_.load(std::memory_order_acquire);
    }

    Stats stats() const override {
        auto& ps = pager_->stats();
        Stats s;
        s.phase = state_.phase();
        s.mode = mode_.load();
        s.total_pages = pager_->total_pages();
        s.pages_present = pager_->present_pages();
        s.pages_pushed = ps.pushed_pages.get();
        s.pages_demanded = ps.demanded_pages.get();
        s.zero_pages = ps.zero.get();
        s.duplicate_pages = ps.duplicate.get();
        s.faults = ps.faults.get();
        s.requests = ps.requests.get();
        s.bytes_received = bytes_received();
        s.bulk_channels = bulk_count_.load();
        s.device_state_bytes = device_bytes_.load();
        s.fault_latency = ps.fault_latency.summary();
        s.fault_latency_histogram = pager_->fault_latency_buckets();
        if (auto bt = pager_->blocktime(); bt.available) {
            s.blocktime_ms = bt.total_ms;
            s.vcpu_blocktime = std::move(bt.threads);
        }
        if (accepted_) s.elapsed_ms = state_.elapsed_ms(accepted_at_);
        s.destination_resumed = resumed_;
        s.pages_missing = pages_missing_.load();
        s.postcopy_ms = postcopy_ms_.load();
        if (s.postcopy_ms == 0 && resumed_) s.postcopy_ms = api::ms_since(resumed_at_);
        if (auto e = state_.error()) s.error = e->message();
        s.pages_removed = ps.removed_pages.get();
        s.stale_pages = stale_pages_.load();
        s.discard_ms = discard_ms_.load();
        s.tls = transport_->security();
        s.auth = net::to_string(cfg_.security.auth);
        s.refused_peers = transport_->refused();
        {
            std::lock_guard lock(chan_mu_);
            s.refused_peers += refused_before_;
            if (link_transport_) s.refused_peers += link_transport_->refused();
        }
        s.uffd_user_mode_only = pager_->user_mode_only();
        s.pauses = pauses_.load();
        s.recoveries = recoveries_.load();
        s.refused_resumes = refused_resumes_.load();
        s.pages_poisoned = pages_poisoned_.load();
        s.vm_stopped = vm_stopped_.load();
        if (auto* r = replicator_ready_.load(std::memory_order_acquire)) {
            const auto& rs = r->stats();
            s.epochs = rs.epochs_sent.get();
            s.epochs_committed = rs.epochs_committed.get();
            s.epoch_pages = rs.pages.get();
            s.epoch_bytes = rs.bytes.get();
            s.epoch_last_pages = rs.last_pages.load();
            s.epoch_largest_pages = rs.largest_pages.load();
            s.epoch_overflows = rs.overflows.get();
            s.epochs_skipped = rs.skipped.get();
            s.epoch_pause = rs.pause.summary();
            s.epoch_pause_histogram = rs.pause.buckets();
            s.epoch_commit = rs.commit.summary();
            s.fenced = r->fenced();
        }
        return s;
    }

private:
    void join() {
        std::lock_guard lock(join_mu_);
        if (thread_.joinable()) thread_.join();
    }

    // Live: each channel counts what it received (the channels exist from accept on).
    std::uint64_t bytes_received() const {
        std::lock_guard lock(chan_mu_);
        std::uint64_t n = bytes_before_;
        if (!channels_ready_.load(std::memory_order_acquire)) return n;
        n += urgent_ ? urgent_->bytes_received() : 0;
        for (const auto& c : bulk_) n += c->bytes_received();
        return n;
    }

    // The first error stops every thread. Once every page is present nothing can fail
    // the migration any more: later errors are echoes of the channels closing, and a
    // cancel() then changes nothing.
    // A post-copy link loss pauses instead (link_lost).
    void fail(const Error& e) {
        if (whole_here()) {
            LZ_LOG(debug, "session_error_after_complete", "side=destination {}", e.message());
            return;
        }
        if (link_lost(e)) return;
        end_session(e);
    }
    void end_session(const Error& e) {
        if (whole_here()) {  // every page is here: nothing can fail the migration now
            LZ_LOG(debug, "session_error_after_complete", "side=destination {}", e.message());
            return;
        }
        if (state_.record(e)) stop_all();
        std::lock_guard lock(precopy_mu_);  // ends a wait for PRECOPY_END
        precopy_cv_.notify_all();
    }
    // Every page is here and the VM runs here (GO arrived). Before GO, every page
    // present (a hybrid's pre-copy round 1 done) is no migration: without the device
    // state and GO the VM never ran here, and a lost source fails it.
    bool whole_here() const { return resumed_.load() && pager_->complete(); }

    void stop_all() {
        stop_.signal();
        std::lock_guard lock(link_.mu);
        link_.stop.signal();
        link_.cv.notify_all();
    }

    Result<void> send_small(const proto::Frame& f, std::string_view what) {
        if (auto r = outbox_->post_and_flush(f, kSendTimeout); !r) return std::unexpected(r.error().wrap(fmt::format("sending {}", what)));
        return {};
    }

    // COMPLETE goes out once, after RESUMED, from whichever thread sees both conditions:
    // pages pushed before the VM resumed can complete a small VM early.
    void maybe_send_complete() {
        if (!resumed_sent_.load() || !pager_->complete() || complete_sent_.exchange(true)) return;
        postcopy_ms_ = api::ms_since(resumed_at_);
        // Hybrid: epochs, the lease and held output go on until the source's RELEASE says
        // it read COMPLETE (session() waits for it): a COMPLETE lost with the link must
        // not leave the VM running here while the source resumes it after the lease.
        if (auto* rep = replicator_ready_.load(std::memory_order_acquire)) rep->complete_sent();
        if (auto r = send_small(proto::encode_empty(proto::Type::complete), "COMPLETE"); !r) return fail(r.error());
    }

    void session() {
        auto r = run();
        // Link loss: pause, wait for recover(), resume; as often as it happens.
        while (!r) {
            fail(r.error());
            if (!link_is_down() || whole_here()) break;
            if (state_.phase() == Phase::switchover) state_.set_phase(Phase::postcopy, "the VM runs here; the link broke");
            teardown_link();
            r = pause_and_recover();
        }
        // Every page is here and COMPLETE went out: the VM runs on here only once the
        // source's RELEASE says it will never resume it; without RELEASE the lease lapses
        // and fences this side (bounded by the lease).
        bool released = true;
        if (auto* rep = replicator_ready_.load(std::memory_order_acquire); rep && complete_sent_.load())
            released = rep->await_release();
        if (watchdog_) watchdog_->stop();
        pager_->stop();
        stop_all();  // the bulk receivers end on EOF after success; make sure either way
        std::uint64_t poisoned_early = 0;
        if (replicator_) {
            // An epoch's pause may be waiting for a vCPU blocked on a page that will never
            // come now (the source is gone): poisoning what never arrived releases it, so
            // the epoch thread can be joined. The VM stops here below in any case.
            if (!pager_->complete())
                if (auto p = pager_->poison_missing(); p) poisoned_early = *p;
            replicator_->stop();
        }
        for (auto& t : bulk_threads_)
            if (t.joinable()) t.join();
        if (rdma_) {
            rdma_->stop();
            const auto rep = rdma_->report();
            LZ_LOG(info, "destination_rdma", "device={} source_on_demand={} fault_reads={} bulk_reads={} samples_checked={}",
                   rep.device, rep.source_on_demand, rep.fault_reads, rep.bulk_reads, rep.samples_checked);
        }
        close_channels();
        if (whole_here() && !released) {
            // The fence paused the vCPUs; a lease a misbehaving source kept renewing
            // without RELEASE ends the wait too, and this side stops the VM itself.
            if (!replicator_->fenced()) cfg_.hooks.pause_vcpus();
            vm_stopped_ = true;
            const Error e{ETIMEDOUT,
                          fmt::format("destination: every page arrived and COMPLETE was sent, but the source's RELEASE "
                                      "did not come within the lease ({} ms): vCPUs paused and output held (fenced). If "
                                      "the source did not read COMPLETE it resumes the VM from epoch {}; if it did, it "
                                      "reports completed and no copy runs: resume this one only then",
                                      cfg_.parameters.lease_ms, replicator_->committed()),
                          ErrorClass::transport_lost};
            state_.forget_error();
            state_.record(e);
            state_.set_phase(Phase::failed, e.message());
            state_.emit(Event{Event::Kind::error, Phase::failed, e.message()});
            return;
        }
        if (whole_here()) {
            // Every page arrived verified: the VM is whole here whatever else happened.
            state_.forget_error();
            if (auto f = pager_->finish(); !f) {
                state_.record(f.error());
                state_.set_phase(Phase::failed, f.error().message());
                state_.emit(Event{Event::Kind::error, Phase::failed, f.error().message()});
                return;
            }
            state_.set_phase(Phase::completed, fmt::format("all {} pages present after {:.1f} ms of post-copy",
                                                           pager_->total_pages(), postcopy_ms_.load()));
            return;
        }
        if (!state_.error()) state_.record(Error{0, "destination: the migration ended before every page arrived"});
        auto e = *state_.error();
        if (resumed_) {
            // The source is lost and pages are missing. Poison what never arrived (a touch
            // raises SIGBUS, never reads zeroes; a vCPU blocked on one is released with
            // it); then, unless poison_on_loss, stop the vCPUs.
            const std::uint64_t missing = pager_->total_pages() - pager_->present_pages();
            pages_missing_ = missing;
            const std::string which = describe_runs(pager_->lacking_runs());
            auto poisoned = pager_->poison_missing();
            if (poisoned) pages_poisoned_ = *poisoned + poisoned_early;
            const std::string how = poisoned ? "" : "; " + poisoned.error().message();
            // Hybrid with back-replication: the source resumes the VM from its checkpoint,
            // so this copy must stop whatever poison_on_loss says (never two running copies).
            if (cfg_.poison_on_loss && poisoned && !replicator_) {
                e.context = fmt::format("{}; the source is lost: {} of {} pages never arrived ({}): poisoned "
                                        "(poison_on_loss): the guest gets a memory error (SIGBUS) on those pages "
                                        "only and keeps running", e.context, missing, pager_->total_pages(), which);
            } else {
                cfg_.hooks.pause_vcpus();
                vm_stopped_ = true;
                e.context = fmt::format("{}; the VM cannot continue: {} of {} pages never arrived{}: {}; its vCPUs "
                                        "were stopped", e.context, missing, pager_->total_pages(),
                                        poisoned ? " (poisoned: a touch raises SIGBUS)" : how, which);
            }
            state_.amend(e);
        }
        const std::string text = e.message();
        state_.set_phase(e.code == ECANCELED ? Phase::cancelled : Phase::failed, text,
                         Event{.pages_missing = pages_missing_.load()});
        state_.emit(Event{.kind = Event::Kind::error, .phase = state_.phase(), .message = text,
                          .pages_missing = pages_missing_.load()});
    }

    Result<void> run() {
        auto urgent = transport_->accept("urgent channel", std::chrono::milliseconds(-1), true);
        if (!urgent) return std::unexpected(urgent.error().wrap("destination: urgent channel"));
        urgent_ = std::move(*urgent);
        outbox_.emplace(*urgent_, link_fd());
        accepted_at_ = Clock::now();
        accepted_ = true;
        state_.set_phase(Phase::setup);
        auto dog = Watchdog::start(stop_.fd(), [this](const Error& e) { fail(e); });
        if (!dog) return std::unexpected(dog.error().wrap("destination"));
        watchdog_ = std::move(*dog);
        watchdog_->arm(cfg_.setup_timeout, "destination: the source did not send its channels, region table and "
                                           "device state in time");
        net::FrameReader ureader(*urgent_);
        const std::string& uwhere = ureader.where();
        auto hello = accept_hello(ureader, proto::Channel::urgent);
        if (!hello) return std::unexpected(hello.error());
        session_id_ = hello->session;
        mode_ = hello->mode;
        if (replicating())  // before the channels: a kernel without WP_ASYNC is refused first
            if (auto r = create_replicator(); !r) return refuse(r.error());
        if (auto r = accept_link_channels(*transport_, hello->bulk_channels); !r) return r;

        auto table_raw = ureader.expect(proto::Type::region_table);
        if (!table_raw) return std::unexpected(table_raw.error());
        auto table = proto::decode_region_table(*table_raw);
        if (!table) return refuse(table.error().wrap(uwhere));
        if (auto c = proto::check_region_table(*table, pager_->guest_regions()); !c) return refuse(c.error());
        if (auto r = start_bulk_receivers(); !r) return r;
        if (auto r = send_small(proto::encode_empty(proto::Type::region_ack), "REGION_ACK"); !r) return r;
        if (transport_->name() == "rdma") {
            auto p = pager::RdmaPuller::setup(
                *pager_, ureader, [&](const proto::Frame& f) { return send_small(f, "RDMA set-up"); },
                *net::rdma_host(local_uri_), session_id_, stop_.fd(), [this](const Error& e) { fail(e); });
            if (!p) return refuse(p.error());
            rdma_ = std::move(*p);
            pager_->set_request_sink(rdma_.get());
            rdma_ready_.store(rdma_.get(), std::memory_order_release);
        }
        // The fault thread starts now, outside the downtime: spawning a thread while the
        // VM is paused cost up to 15 ms on a loaded 2-core host. Its requests can only
        // reach the source after REGION_ACK, which the source reads last before it
        // sends the device state and starts serving.
        if (auto s = pager_->start(*outbox_, [this](const Error& e) { fail(e); }); !s) return s;

        if (mode_ != Mode::postcopy) {
            // Pre-copy rounds last as long as their own bounds allow (max_rounds, bytes,
            // time, set at the source); the setup deadline ends here.
            watchdog_->disarm();
            state_.set_phase(Phase::precopy);
        }
        ureader.set_max_device_state(cfg_.max_device_state);  // legal from here to the device state
        auto dev = switchover_frames(ureader);
        ureader.set_max_device_state(proto::kMaxControlPayload);
        if (!dev) return std::unexpected(dev.error());
        device_bytes_ = dev->size();
        if (cfg_.hooks.load_device_state)
            if (auto l = cfg_.hooks.load_device_state(*dev); !l) return refuse(l.error().wrap("load_device_state"));
        if (replicating())
            if (auto r = prepare_replication(); !r) return refuse(r.error());
        // Two-phase: only GO lets the VM run here; until then the source may take it back.
        if (int e = failpoint::check("destination_before_device_loaded", 0, 0, 0))
            return sys_error("destination: failpoint destination_before_device_loaded", e);
        watchdog_->arm(cfg_.setup_timeout, "destination: no GO from the source after DEVICE_LOADED; the VM was not "
                                           "resumed here");
        device_loaded_at_ = Clock::now();  // GO answers it: the lease's first anchor
        if (auto r = send_small(proto::encode_empty(proto::Type::device_loaded), "DEVICE_LOADED"); !r) return r;

        return urgent_loop(ureader, false);
    }

    // The urgent channel after DEVICE_LOADED (`go` false) or on a recovered link (true):
    // demand replies, heartbeats, GO; until the source closes it or something fails.
    // Until GO, pages the VMM's own early touches asked for may arrive: placed, never run.
    Result<void> urgent_loop(net::FrameReader& ureader, bool go) {
        const std::string& uwhere = ureader.where();
        auto r = pager::receive_loop(ureader, *pager_, true, [&](const proto::Header& h, std::vector<std::byte> p) -> Result<bool> {
            if (h.type == proto::Type::heartbeat) {
                if (replicator_ && go) replicator_->heartbeat_echoed();
                return true;
            }
            if (h.type == proto::Type::go && !go) {
                go = true;
                if (auto g = on_go(uwhere); !g) return std::unexpected(g.error());
                return true;
            }
            if (h.type == proto::Type::error) return std::unexpected(net::peer_error(p, uwhere));
            return peer_violation(fmt::format("{}: unexpected {} {}", uwhere, proto::to_string(h.type),
                                              go ? "during post-copy" : "before GO"));
        });
        if (!r) return r;
        if (!pager_->complete())
            return transport_error(fmt::format("{}: the source closed the connection", uwhere), ECONNRESET);
        return {};
    }

    // GO: the VM runs here from now on; heartbeats start.
    Result<void> on_go(const std::string& uwhere) {
        watchdog_->disarm();
        if (int e = failpoint::check("destination_after_go", 0, 0, 0))
            return sys_error("destination: failpoint destination_after_go", e);
        // Output commit from the first instruction the VM runs here: what it outputs
        // before the replicator starts (below) is held for the first epoch's commit.
        if (replicator_) first_epoch_.store(replicator_->open_epoch(), std::memory_order_release);
        cfg_.hooks.resume_vcpus();
        resumed_at_ = Clock::now();
        resumed_ = true;
        if (auto r = send_small(proto::encode_empty(proto::Type::resumed), "RESUMED"); !r) return r;
        resumed_sent_ = true;
        state_.set_phase(Phase::postcopy);
        if (replicator_) {
            // Before the heartbeats start: every beat's send time is recorded (lease anchors).
            if (auto s = replicator_->start(*replication_, device_loaded_at_, [this](const Error& e) { fail(e); }); !s)
                return s;
            replicator_ready_.store(replicator_.get(), std::memory_order_release);
        }
        if (auto m = map_staged(); !m) return m;
        watch_link(uwhere);
        maybe_send_complete();
        return {};
    }

    // Heartbeats on the current link's urgent channel (the watchdog thread calls the beat;
    // teardown_link() takes the outbox from it under beat_mu_ before it is destroyed).
    void watch_link(const std::string& uwhere) {
        {
            std::lock_guard lock(beat_mu_);
            beat_out_ = &*outbox_;
        }
        watchdog_->watch(*urgent_, cfg_.parameters.heartbeat_timeout, [this] {
            static const proto::Frame beat = proto::encode_empty(proto::Type::heartbeat);
            std::lock_guard lock(beat_mu_);
            // Full queue: traffic is flowing anyway. A beat sent is a lease anchor (hybrid).
            if (beat_out_ && beat_out_->post(beat) && replicator_) replicator_->heartbeat_sent();
        }, fmt::format("destination: {}", uwhere));
    }

    int link_fd() {
        return link_.fd();
    }

    // ─── Link loss: pause and recover ──────────────────────────────────────────────
    // fail() → link_lost(): a transport_lost error in post-copy (or recovering), or
    // pause(), marks the link down and signals link_.stop: the urgent loop and the bulk
    // receivers end. session() then calls teardown_link() (fault thread detached from the
    // outbox — it goes on marking faults REQUESTED, sending nothing —, receivers joined,
    // channels closed) and pause_and_recover(): Phase::paused until recover(uri) (which
    // listens: next_transport_), cancel(), or Parameters::recover_timeout — the last two
    // end the session as a source loss (the end of session()). resume() is the resume
    // handshake of src/protocol.hpp: RESUME (another session id is refused and the
    // listener goes on), LACKING runs, the bulk channels, the outbox attached again and
    // every REQUESTED page asked for again; then urgent_loop() as before.

    bool link_lost(const Error& e) {
        std::lock_guard lock(link_.mu);
        if (stop_.signalled()) return false;
        if (link_.down) {
            LZ_LOG(debug, "destination_link_echo", "{}", e.message());
            return true;
        }
        const Phase p = state_.phase();
        // resumed_ in switchover: the VM runs here and RESUMED is on its way; the phase
        // follows in on_go() — or in session() if the link broke first. Hybrid with
        // back-replication does not pause: the lease fences this side and the source
        // resumes the VM from its last committed epoch (pager/replicator.hpp).
        const bool running_here = p == Phase::postcopy || p == Phase::recovering || (p == Phase::switchover && resumed_);
        if (e.kind != ErrorClass::transport_lost || rdma_ready_.load() || replicator_ || !running_here) return false;
        link_.lose(e, "destination_link_lost");
        return true;
    }
    bool link_is_down() { return link_.is_down(stop_); }

    // Ends what lives with the link; the pager, its fault thread and the page-state
    // table stay.
    void teardown_link() {
        if (auto d = pager_->detach_outbox(); !d) LZ_LOG(error, "destination_detach", "{}", d.error().message());
        for (auto& t : bulk_threads_)
            if (t.joinable()) t.join();
        bulk_threads_.clear();
        if (watchdog_) {
            watchdog_->unwatch();
            watchdog_->disarm();
        }
        close_channels();
        std::lock_guard lock(chan_mu_);
        if (link_transport_) {
            refused_before_ += link_transport_->refused();
            link_transport_.reset();
        }
    }

    Result<void> pause_and_recover() {
        const std::string why = link_.why();
        ++pauses_;
        state_.set_phase(Phase::paused, fmt::format("post-copy paused: {}", why));
        const auto limit = cfg_.parameters.recover_timeout;
        {
            std::unique_lock lock(link_.mu);
            link_.cv.wait_for(lock, limit, [&] { return next_transport_ != nullptr || stop_.signalled(); });
            if (stop_.signalled()) return std::unexpected(state_.error().value_or(Error{ECANCELED, "destination: stopped"}));
            if (!next_transport_) {
                lock.unlock();
                Error e{ETIMEDOUT, fmt::format("destination: post-copy paused for {} ms (recover_timeout) without "
                                               "recover() ({}): the source is taken as lost", limit.count(), why)};
                end_session(e);
                return std::unexpected(e);
            }
            link_.replace(std::move(next_link_stop_));
            std::lock_guard clock(chan_mu_);
            link_transport_ = std::move(next_transport_);
        }
        state_.set_phase(Phase::recovering, fmt::format("recovering: listening on {}", local_uri()));
        auto r = resume();
        if (!r && !stop_.signalled()) r.error().kind = ErrorClass::transport_lost;  // back to paused
        if (!r) return r;
        ++recoveries_;
        // A link lost inside on_go() may have left RESUMED unsent (or its flush failed
        // after the frame left): the resume handshake is the source's word that the VM
        // runs here, so COMPLETE may follow from now on — at once if every page is here.
        resumed_sent_ = true;
        state_.set_phase(Phase::postcopy, "post-copy resumed after recover");
        maybe_send_complete();
        return urgent_loop(*ureader_, true);
    }

    // The destination's half of the resume handshake (src/protocol.hpp).
    Result<void> resume() {
        const auto limit = cfg_.parameters.recover_timeout;
        for (;;) {
            auto urgent = link_transport_->accept("urgent channel", limit, true);
            if (!urgent) return std::unexpected(urgent.error().wrap("destination: recover: waiting for the source"));
            auto reader = std::make_unique<net::FrameReader>(**urgent);
            watchdog_->arm(cfg_.setup_timeout, "destination: recover: the source did not send RESUME in time");
            auto raw = reader->expect(proto::Type::resume);
            watchdog_->disarm();
            // A peer that authenticated but sends something else is refused like a
            // stranger; the link failing is a failure of this recover.
            if (!raw && raw.error().kind != ErrorClass::peer_violation)
                return std::unexpected(raw.error().wrap("destination: recover"));
            auto resume = raw ? proto::decode_resume(*raw) : Result<proto::Resume>(std::unexpected(raw.error()));
            std::string refusal;
            if (!resume) refusal = resume.error().wrap(reader->where()).message();
            else if (resume->session != session_id_)
                refusal = fmt::format("{}: RESUME from another migration (session {:#x}, expected {:#x})",
                                      reader->where(), resume->session, session_id_);
            else if (resume->bulk_channels != bulk_count_.load())
                refusal = fmt::format("{}: RESUME announces {} bulk channels, this migration has {}", reader->where(),
                                      resume->bulk_channels, bulk_count_.load());
            if (refusal.empty()) {
                std::lock_guard lock(chan_mu_);
                urgent_ = std::move(*urgent);
                ureader_ = std::move(reader);
                break;
            }
            // A stranger: told why, closed; the real source may still call.
            (void)net::send_frame(**urgent, proto::encode(proto::ErrorMsg{0, refusal}));
            ++refused_resumes_;
            LZ_LOG(warn, "destination_resume_refused", "{}", refusal);
        }
        if (int e = failpoint::check("recover_handshake", 0, 0, 0))
            return transport_error("destination: recover: failpoint recover_handshake", e);
        outbox_.emplace(*urgent_, link_fd());
        // What is still lacking here: the source's sent map becomes the complement.
        const auto runs = pager_->lacking_runs();
        std::uint64_t lacking = 0;
        for (std::size_t i = 0; i < runs.size(); i += proto::kMaxStaleRuns) {
            proto::Lacking part;
            part.runs.assign(runs.begin() + i, runs.begin() + std::min(runs.size(), i + proto::kMaxStaleRuns));
            for (const auto& run : part.runs) lacking += run.count;
            if (auto r = send_small(proto::encode(part), "LACKING"); !r) return r;
        }
        if (auto r = send_small(proto::encode(proto::LackingEnd{lacking}), "LACKING_END"); !r) return r;
        if (auto r = accept_link_channels(*link_transport_, bulk_count_.load()); !r) return r;
        if (auto r = start_bulk_receivers(); !r) return r;
        // The fault thread sends on the new link from here; what it marked REQUESTED
        // before (and what was in flight when the link broke) is asked for again.
        if (auto a = pager_->attach_outbox(*outbox_); !a) return a;
        std::uint64_t again = 0;
        for (const auto& req : pager_->requested_runs()) {
            if (auto r = send_small(proto::encode(req), "PAGE_REQUEST (again)"); !r) return r;
            again += req.count;
        }
        LZ_LOG(info, "destination_resume", "lacking={} requested_again={}", lacking, again);
        watch_link(ureader_->where());
        return {};
    }

    // "ram0 pages 100..163, 900..901 and 12 more runs"
    std::string describe_runs(const std::vector<proto::StaleRun>& runs) const {
        if (runs.empty()) return "none";
        constexpr std::size_t kShown = 4;
        std::string out;
        std::uint32_t last_region = UINT32_MAX;
        for (std::size_t i = 0; i < std::min(kShown, runs.size()); ++i) {
            const auto& r = runs[i];
            if (r.region != last_region) {
                if (!out.empty()) out += "; ";
                out += fmt::format("{} pages ", pager_->guest_regions()[r.region].name);
                last_region = r.region;
            } else {
                out += ", ";
            }
            out += r.count == 1 ? fmt::format("{}", r.first) : fmt::format("{}..{}", r.first, r.first + r.count - 1);
        }
        if (runs.size() > kShown) out += fmt::format(" and {} more runs", runs.size() - kShown);
        return out;
    }

    // From REGION_ACK to DEVICE_STATE on the urgent channel: nothing in post-copy mode;
    // in pre-copy modes any number of STALE frames. Each STALE and the DEVICE_STATE wait
    // until every bulk channel delivered PRECOPY_END: a pre-copy copy still in flight
    // would otherwise land after its page was made missing, or be mapped stale.
    // Returns the device state.
    Result<std::vector<std::byte>> switchover_frames(net::FrameReader& ureader) {
        const std::string& where = ureader.where();
        for (;;) {
            auto h = ureader.next();
            if (!h) return std::unexpected(h.error());
            if (!*h) return transport_error(fmt::format("{}: the source closed the connection before the device state", where), ECONNRESET);
            auto payload = ureader.read_control(**h);
            if (!payload) return std::unexpected(payload.error());
            const auto type = (*h)->type;
            if (type == proto::Type::error) return std::unexpected(net::peer_error(*payload, where));
            const bool precopy = mode_ != Mode::postcopy;
            if (type != proto::Type::device_state && !(type == proto::Type::stale && precopy))
                return refuse(Error{0, fmt::format("{}: unexpected {} before the device state", where, proto::to_string(type)),
                                    ErrorClass::peer_violation});
            if (state_.phase() != Phase::switchover) state_.set_phase(Phase::switchover);
            if (precopy)
                if (auto w = await_precopy_end(); !w) return std::unexpected(w.error());
            if (type == proto::Type::device_state) return std::move(*payload);
            auto set = proto::decode_stale(*payload);
            if (!set) return refuse(set.error().wrap(where));
            if (auto a = apply_stale(*set, where); !a) return std::unexpected(a.error());
        }
    }

    // Pages dirtied on the source after they were sent go back to MISSING. memfd: their
    // STAGED bytes are simply never mapped (no zap); anonymous: MADV_DONTNEED per run,
    // whose cost is discard_ms, inside the downtime.
    Result<void> apply_stale(const proto::StaleSet& set, const std::string& where) {
        const auto t0 = Clock::now();
        const auto& regions = pager_->regions();
        for (const auto& run : set.runs) {
            if (run.region >= regions.size() || run.first > regions[run.region].pages ||
                run.count > regions[run.region].pages - run.first)
                return refuse(Error{0, fmt::format("{}: STALE pages {}..{} of region {}, which has {} pages", where, run.first,
                                                   proto::last_page(run.first, run.count), run.region,
                                                   run.region < regions.size() ? regions[run.region].pages : 0),
                                    ErrorClass::peer_violation});
            auto back = pager_->make_missing(run.region, run.first, run.count);
            if (!back) return std::unexpected(back.error());
            stale_pages_ += run.count;
        }
        discard_ms_ = discard_ms_.load() + api::ms_since(t0);
        return {};
    }

    // A bulk channel delivered ROUND_END{n}: everything it carried of round n is placed.
    // Once every channel did, ROUND_ACK{n}. One round at a time: the source waits for
    // the ack before it starts the next.
    Result<void> round_ended(std::uint32_t n, const std::string& where) {
        bool ack = false;
        {
            std::lock_guard lock(precopy_mu_);
            // Every channel ends its rounds in order (receive_bulk); a channel a round ahead
            // of another means the source did not wait for the ack.
            if (n != round_ && !(n == round_ + 1 && (round_ == 0 || round_ends_ == bulk_count_.load())))
                return peer_violation(fmt::format("{}: ROUND_END {} before every channel ended round {}", where, n, round_));
            if (n != round_) {
                round_ = n;
                round_ends_ = 0;
            }
            ack = ++round_ends_ == bulk_count_.load();
        }
        if (ack) return send_small(proto::encode(proto::Type::round_ack, proto::RoundMark{n}), "ROUND_ACK");
        return {};
    }

    Result<void> await_precopy_end() {
        std::unique_lock lock(precopy_mu_);
        const bool done = precopy_cv_.wait_for(lock, kChannelTimeout, [&] {
            return precopy_ends_ == bulk_count_.load() || state_.error().has_value();
        });
        if (auto e = state_.error()) return std::unexpected(*e);
        if (!done)
            return transport_error(fmt::format("destination: {} of {} bulk channels delivered PRECOPY_END within {} s",
                                               precopy_ends_, bulk_count_.load(), kChannelTimeout.count() / 1000),
                                   ETIMEDOUT);
        return {};
    }

    // Pre-copy pages of a file staged in the page cache are mapped now, in long runs,
    // while the VM runs (a fault on one meanwhile is served locally by the fault thread).
    Result<void> map_staged() {
        if (mode_ == Mode::postcopy) return {};
        constexpr std::uint64_t kRun = 32768;  // pages per call: CONTINUE runs at ~47 GB/s at this size
        const auto& regions = pager_->regions();
        for (std::uint32_t ri = 0; ri < regions.size(); ++ri) {
            if (!regions[ri].file_backed()) continue;
            for (std::uint64_t p = 0; p < regions[ri].pages; p += kRun) {
                if (stop_requested()) return {};
                auto n = pager_->map_staged(ri, p, std::min(kRun, regions[ri].pages - p));
                if (!n) return std::unexpected(n.error().wrap("destination: mapping pre-copied pages"));
            }
        }
        return {};
    }

    bool stop_requested() const { return state_.error().has_value(); }

    // At the end of the session, every thread that used them joined: the sockets close
    // now, not when the Destination is destroyed. A source blocked sending into a
    // window this side no longer reads (a pre-copy round, after a refused frame) gets
    // a reset at once instead of waiting on a peer that will never read again.
    void close_channels() {
        {
            std::lock_guard lock(beat_mu_);
            beat_out_ = nullptr;
        }
        outbox_.reset();
        {
            std::lock_guard lock(chan_mu_);
            bytes_before_ += (urgent_ ? urgent_->bytes_received() : 0);
            for (const auto& c : bulk_) bytes_before_ += c->bytes_received();
            channels_ready_.store(false, std::memory_order_release);
            urgent_.reset();
            bulk_.clear();
            bulk_readers_.clear();
        }
        replication_.reset();
    }

    // The channels of a link after the urgent one, at first contact and at every
    // recover — the one place that accepts them (a replication channel joins here):
    // the N bulk channels the urgent HELLO (or RESUME) announced, in whatever order they
    // arrive. The listener closes after the last.
    Result<void> accept_link_channels(net::Transport& transport, std::uint32_t count) {
        bulk_count_ = count;
        std::vector<std::unique_ptr<net::Channel>> by_index(count);
        std::vector<std::unique_ptr<net::FrameReader>> readers(count);
        for (std::uint32_t n = 0; n < count; ++n) {
            auto ch = transport.accept("bulk channel", kChannelTimeout, false);
            if (!ch) return std::unexpected(ch.error().wrap(fmt::format("destination: bulk channel {} of {}", n + 1, count)));
            auto reader = std::make_unique<net::FrameReader>(**ch);
            auto hello = accept_hello(*reader, proto::Channel::bulk, count);
            if (!hello) return std::unexpected(hello.error());
            if (by_index[hello->index]) {
                auto e = Error{0, fmt::format("{}: a second bulk channel {}", reader->where(), hello->index),
                               ErrorClass::peer_violation};
                return std::unexpected(e);
            }
            by_index[hello->index] = std::move(*ch);
            readers[hello->index] = std::move(reader);
        }
        // Hybrid: the replication channel, which the source opens after the bulk channels.
        // First contact only: a replicating migration does not pause (link_lost()).
        if (replicating() && &transport == transport_.get())
            if (auto r = accept_replication(transport); !r) return r;
        transport.close_listener();
        std::lock_guard lock(chan_mu_);
        bulk_ = std::move(by_index);
        bulk_readers_ = std::move(readers);
        channels_ready_.store(true, std::memory_order_release);
        return {};
    }

    bool replicating() const { return mode_ == Mode::hybrid && cfg_.parameters.epoch_ms != 0; }

    // Hybrid: the replication channel, which the source opens after the bulk channels.
    Result<void> accept_replication(net::Transport& transport) {
        auto ch = transport.accept("replication channel", kChannelTimeout, false);
        if (!ch) return std::unexpected(ch.error().wrap("destination: replication channel"));
        net::FrameReader reader(**ch);
        auto hello = accept_hello(reader, proto::Channel::replication);
        if (!hello) return std::unexpected(hello.error());
        replication_ = std::move(*ch);
        return {};
    }

    // Hybrid, at setup: the staging area is populated outside the downtime, and a
    // kernel without WP_ASYNC is refused before any page moves.
    Result<void> create_replicator() {
        if (auto p = pager_->can_track_writes(); !p) return p;
        auto r = pager::Replicator::create(
            *pager_, cfg_.hooks,
            pager::ReplicatorConfig{.epoch = std::chrono::milliseconds(cfg_.parameters.epoch_ms),
                                    .staging_bytes = cfg_.parameters.epoch_staging_bytes,
                                    .lease = std::chrono::milliseconds(cfg_.parameters.lease_ms)});
        if (!r) return std::unexpected(r.error());
        replicator_ = std::move(*r);
        return {};
    }

    // Hybrid, before DEVICE_LOADED (the VM has not run here; a refusal lets the source
    // resume it): every page write-protected and placed so from now on.
    Result<void> prepare_replication() { return pager_->track_writes(); }

    // Starts a receiver per bulk channel: only after the region table was accepted, so
    // no PAGES frame is read, let alone placed, before it.
    Result<void> start_bulk_receivers() {
        for (std::uint32_t i = 0; i < bulk_readers_.size(); ++i) {
            try {
                bulk_threads_.emplace_back([this, reader = std::shared_ptr<net::FrameReader>(std::move(bulk_readers_[i]))] {
                    if (auto r = receive_bulk(*reader); !r) fail(r.error());
                });
            } catch (const std::system_error& e) {
                return sys_error(fmt::format("destination: starting the receiver of bulk channel {}", i), e.code().value());
            }
        }
        return {};
    }

    // Reads a channel's HELLO and answers it on the same channel.
    Result<proto::Hello> accept_hello(net::FrameReader& reader, proto::Channel want, std::uint32_t bulk_count = 0) {
        auto raw = reader.expect(proto::Type::hello);
        if (!raw) return std::unexpected(raw.error());
        auto refuse_here = [&](Error e) -> Result<proto::Hello> {
            (void)net::send_frame(reader.channel(), proto::encode(proto::ErrorMsg{0, e.context}));
            e.kind = ErrorClass::peer_violation;
            return std::unexpected(std::move(e));
        };
        auto hello = proto::decode_hello(*raw);
        if (!hello) {
            auto e = hello.error().wrap(reader.where());
            (void)net::send_frame(reader.channel(), proto::encode(proto::ErrorMsg{0, hello.error().context}));
            return std::unexpected(e);
        }
        if (hello->channel != want)
            return refuse_here(Error{0, fmt::format("{}: HELLO for the {} channel where the {} channel was expected",
                                                    reader.where(), proto::to_string(hello->channel), proto::to_string(want))});
        if (want != proto::Channel::urgent && hello->session != session_id_)
            return refuse_here(Error{0, fmt::format("{}: HELLO from another migration (session {:#x}, expected {:#x})",
                                                    reader.where(), hello->session, session_id_)});
        if (want == proto::Channel::bulk && hello->bulk_channels != bulk_count)
            return refuse_here(Error{0, fmt::format("{}: HELLO announces {} bulk channels, the urgent channel said {}",
                                                    reader.where(), hello->bulk_channels, bulk_count)});
        if (auto r = net::send_frame(reader.channel(), proto::encode(proto::HelloAck{})); !r)
            return std::unexpected(r.error());
        return *hello;
    }

    // Tells the source why, then fails with the same words.
    std::unexpected<Error> refuse(const Error& e) {
        (void)send_small(proto::encode(proto::ErrorMsg{0, e.message()}), "ERROR");
        return std::unexpected(e);
    }

    Result<void> receive_bulk(net::FrameReader& reader) {
        bool precopy_open = mode_ != Mode::postcopy;
        std::uint32_t last_round = 0;  // each channel ends rounds 1, 2, 3... in order
        auto r = pager::receive_loop(reader, *pager_, false, [&](const proto::Header& h, std::vector<std::byte> p) -> Result<bool> {
            if (h.type == proto::Type::push_done) return true;
            if (auto* rd = rdma_ready_.load(std::memory_order_acquire))
                if (auto took = rd->on_frame(h, p, reader.where()); !took || *took) return took ? Result<bool>(true) : took;
            if (h.type == proto::Type::round_end && precopy_open) {
                auto mark = proto::decode_round(h.type, p);
                if (!mark) return std::unexpected(mark.error().wrap(reader.where()));
                if (mark->round != last_round + 1)
                    return peer_violation(fmt::format("{}: ROUND_END {} after round {}", reader.where(), mark->round,
                                                      last_round));
                last_round = mark->round;
                if (auto a = round_ended(mark->round, reader.where()); !a) return std::unexpected(a.error());
                return true;
            }
            if (h.type == proto::Type::precopy_end && precopy_open) {
                precopy_open = false;
                std::lock_guard lock(precopy_mu_);
                ++precopy_ends_;
                precopy_cv_.notify_all();
                return true;
            }
            if (h.type == proto::Type::error) return std::unexpected(net::peer_error(p, reader.where()));
            return peer_violation(fmt::format("{}: unexpected {}", reader.where(), proto::to_string(h.type)));
        }, mode_ != Mode::postcopy ? &precopy_open : nullptr);
        if (!r) return r;
        if (!pager_->complete())
            return transport_error(fmt::format("{}: the source closed the connection", reader.where()), ECONNRESET);
        return {};
    }

    static constexpr const char* kReplicatingNoPause =
        "destination: a hybrid post-copy with back-replication does not pause or recover in this build: a lost "
        "link fences this side when its lease lapses and the source resumes the VM from its last committed epoch "
        "(epoch_ms 0 on both sides: a hybrid that pauses and recovers like a post-copy)";
    static constexpr const char* kRdmaNoRecover =
        "destination: an RDMA post-copy cannot pause or recover in this build (its queue pairs are not "
        "re-established); use a tcp: URI for a recoverable post-copy";

    DestinationConfig cfg_;
    std::unique_ptr<pager::Pager> pager_;
    std::unique_ptr<net::Transport> transport_;  // the first link's
    std::string local_uri_;  // under chan_mu_ (recover() may change it)
    net::ShutdownEvent stop_;
    // Link loss (section above): the link's stop event and the transports are replaced under link_.mu.
    api::Link link_;
    net::ShutdownEvent next_link_stop_;
    std::unique_ptr<net::Transport> next_transport_;  // recover() listened: the session accepts
    std::unique_ptr<net::Transport> link_transport_;  // a recovered link's (also under chan_mu_)
    std::unique_ptr<net::FrameReader> ureader_;       // a recovered link's urgent channel
    std::shared_ptr<net::TlsContext> tls_;
    mutable std::mutex chan_mu_;  // urgent_, bulk_, link_transport_, local_uri_ against stats()
    std::uint64_t bytes_before_ = 0, refused_before_ = 0;  // of links that ended
    std::mutex beat_mu_;
    net::Outbox* beat_out_ = nullptr;
    std::atomic<std::uint32_t> pauses_{0}, recoveries_{0};
    std::atomic<std::uint64_t> refused_resumes_{0}, pages_poisoned_{0};
    std::atomic<bool> vm_stopped_{false};
    api::SessionState state_;
    // Written by the session thread before channels_ready_ is set; read by stats().
    std::unique_ptr<net::Channel> urgent_;
    std::vector<std::unique_ptr<net::Channel>> bulk_;
    std::vector<std::unique_ptr<net::FrameReader>> bulk_readers_;  // until their receivers start
    std::optional<net::Outbox> outbox_;
    std::unique_ptr<pager::RdmaPuller> rdma_;  // rdma: URIs only; threads joined in session()
    std::atomic<pager::RdmaPuller*> rdma_ready_{nullptr};
    std::unique_ptr<Watchdog> watchdog_;  // stopped before the channels close
    std::unique_ptr<net::Channel> replication_;  // hybrid
    std::unique_ptr<pager::Replicator> replicator_;  // hybrid; stopped in session()
    std::atomic<pager::Replicator*> replicator_ready_{nullptr};  // for stats()/open_epoch()
    std::atomic<std::uint64_t> first_epoch_{0};  // open_epoch() from GO until replicator_ready_
    Clock::time_point device_loaded_at_{};
    std::atomic<bool> channels_ready_{false};
    std::atomic<std::uint32_t> bulk_count_{0};
    std::mutex join_mu_;
    std::thread thread_;
    std::vector<std::thread> bulk_threads_;
    std::uint64_t session_id_ = 0;
    std::atomic<Mode> mode_{Mode::invalid};
    std::atomic<std::uint64_t> device_bytes_{0}, pages_missing_{0};
    std::atomic<double> postcopy_ms_{0}, discard_ms_{0};
    std::atomic<std::uint64_t> stale_pages_{0};
    std::mutex precopy_mu_;
    std::condition_variable precopy_cv_;
    std::uint32_t precopy_ends_ = 0;  // bulk channels that delivered PRECOPY_END
    std::uint32_t round_ = 0, round_ends_ = 0;  // the pre-copy round ending; channels that ended it
    std::atomic<bool> accepted_{false}, resumed_{false}, resumed_sent_{false}, complete_sent_{false};
    Clock::time_point accepted_at_{}, resumed_at_{};
};

}  // namespace

Result<std::unique_ptr<Destination>> Destination::listen(DestinationConfig config) {
    std::optional<Result<uffd::Uffd>> adopted;  // owned from here, whatever fails below
    if (config.uffd >= 0) adopted = uffd::Uffd::adopt(std::exchange(config.uffd, -1));
    if (!config.hooks.pause_vcpus || !config.hooks.resume_vcpus)
        return logic_error("destination: hooks pause_vcpus and resume_vcpus are required");
    if (config.setup_timeout.count() <= 0 || config.parameters.heartbeat_timeout.count() <= 0)
        return logic_error("destination: setup_timeout and parameters.heartbeat_timeout must be positive");
    if (config.max_device_state > proto::kMaxDeviceState)
        return logic_error(fmt::format("destination: max_device_state {} is more than the protocol's {}",
                                       config.max_device_state, proto::kMaxDeviceState));
    const bool rdma = net::is_rdma_uri(config.uri);
    if (!rdma)
        if (auto at = net::parse_uri(config.uri); !at) return std::unexpected(at.error().wrap("destination"));
    if (adopted && !*adopted) return std::unexpected(adopted->error().wrap("destination"));
    auto pager = adopted ? pager::Pager::adopt(std::move(**adopted), config.regions, config.parameters.prefetch_pages)
                         : pager::Pager::create(config.regions, config.parameters.prefetch_pages, config.allow_user_mode_only);
    if (!pager) return std::unexpected(pager.error());
    if (config.parameters.recover_timeout.count() <= 0)
        return logic_error("destination: parameters.recover_timeout must be positive");
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    auto link_stop = net::ShutdownEvent::create();
    if (!link_stop) return std::unexpected(link_stop.error());
    auto tls = net::tls_for(config.security, true);
    if (!tls) return std::unexpected(tls.error().wrap("destination"));
    // An rdma: URI gets RDMA or an error that says why, never TCP instead.
    auto transport = rdma ? net::rdma_listener(config.uri, link_stop->fd(), *tls)
                          : net::tcp_listener(config.uri, link_stop->fd(), *tls);
    if (!transport) return std::unexpected(transport.error().wrap("destination"));
    auto d = std::make_unique<DestinationImpl>(std::move(config), std::move(*pager), std::move(*transport),
                                               std::move(*stop), std::move(*link_stop), std::move(*tls));
    if (auto s = d->start(); !s) return std::unexpected(s.error());
    return d;
}

}  // namespace lazymig
