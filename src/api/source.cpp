// The source endpoint: connect, handshake, switchover, then serve and push.
//
// Threads: the session thread (opens the channels, hands over, then serves the urgent
// channel), the pusher's, one per bulk channel, and in hybrid mode the replication
// thread (from RESUMED: receives and applies the destination's epochs, EpochApplier).
// Two shutdown eventfds: the session's `stop_` (cancel()/wait()/~SourceImpl, the first
// fatal error) ends everything; the link's `link_.stop` (one per connection generation,
// signalled too by stop_all()) ends every wait of that link's channels only. Phases
// follow src/session_phase.hpp.
//
// Pause and recover (post-copy, TCP): see the section "Link loss: pause and recover"
// below and the diagram in src/protocol.hpp. Hybrid with back-replication does not
// pause: the destination lost, the VM resumes here from the last committed epoch
// (resume_from_checkpoint).
#include <condition_variable>
#include <optional>
#include <random>

#include <fmt/format.h>

#include "precopy/epoch_applier.hpp"
#include "precopy/rdma_serve.hpp"
#include "precopy/precopy.hpp"
#include "precopy/source.hpp"
#include "src/api/session.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include "src/net/rdma.hpp"
#include "src/net/socket.hpp"
#include "src/net/tls.hpp"
#include "src/failpoint.hpp"
#include "src/region.hpp"
#include "src/watchdog.hpp"

namespace lazymig {
namespace {

using Clock = std::chrono::steady_clock;

class SourceImpl final : public Source {
public:
    SourceImpl(SourceConfig config, std::unique_ptr<net::Transport> transport, net::ShutdownEvent stop,
               net::ShutdownEvent link_stop, std::shared_ptr<net::TlsContext> tls,
               std::unique_ptr<source::PageReader> reader)
        : cfg_(std::move(config)), transport_(std::move(transport)), stop_(std::move(stop)),
          link_{.stop = std::move(link_stop)}, tls_(std::move(tls)), state_(cfg_.hooks, "source"), sent_(cfg_.regions),
          reader_(std::move(reader)) {
        bandwidth_ = cfg_.parameters.max_bandwidth;
        params_ = cfg_.parameters;
        batch_ = cfg_.parameters.push_batch_pages;
        bulk_count_ = cfg_.parameters.bulk_channels ? cfg_.parameters.bulk_channels : default_bulk_channels();
        for (const auto& r : cfg_.regions) total_pages_ += r.size / r.page_size;
    }
    ~SourceImpl() override {
        stop_all();
        join();
    }

    Result<void> migrate() override {
        std::lock_guard lock(mu_);
        if (started_) return logic_error("source: migrate() was already called for this migration");
        {
            // What set_parameters() said before migrate() about replication holds for the
            // whole migration (read by the session without a lock).
            std::lock_guard plock(params_mu_);
            cfg_.parameters.epoch_ms = params_.epoch_ms;
            cfg_.parameters.lease_ms = params_.lease_ms;
        }
        if (cfg_.mode != Mode::postcopy) {
            precopy_ = std::make_unique<source::Precopy>(
                cfg_.regions, *reader_, sent_, stats_,
                source::PrecopyConfig{.mode = cfg_.mode, .max_bandwidth = &bandwidth_, .parameters = [this] {
                                          std::lock_guard lock(params_mu_);
                                          return params_;
                                      }});
        }
        start_ = Clock::now();
        try {
            thread_ = std::thread([this] {
                api::SessionState::current = this;
                session();
            });
        } catch (const std::system_error& e) {
            return sys_error("source: starting the session thread", e.code().value());
        }
        started_ = true;
        return {};
    }

    Result<void> wait() override {
        if (api::SessionState::current == this)
            return std::unexpected(Error{EDEADLK, "source: wait() called from a hook on the migration's own thread"});
        join();
        if (auto e = state_.error()) return std::unexpected(*e);
        if (!started_) return logic_error("source: wait() before migrate()");
        return {};
    }

    // From a hook on the session's own thread this only requests the stop: joining
    // would wait for the very thread that runs the hook.
    void cancel() override {
        if (!completed_) {
            cancelled_ = true;
            end_session(Error{ECANCELED, "source: migration cancelled"});
        }
        if (api::SessionState::current != this) join();
    }

    Result<void> pause() override {
        if (rdma_mode_) return logic_error(kRdmaNoRecover);
        if (applier_ready_.load()) return logic_error(kReplicatingNoPause);
        const Phase p = state_.phase();
        if (p != Phase::postcopy && p != Phase::recovering)
            return logic_error(fmt::format("source: pause() during {}: only a post-copy can pause (before it the VM "
                                           "runs here and cancel() keeps it here; after it there is nothing to pause)",
                                           to_string(p)));
        fail(Error{ECONNABORTED, "source: paused on purpose (pause())", ErrorClass::transport_lost});
        return {};
    }

    Result<void> recover(std::string uri) override {
        if (rdma_mode_) return logic_error(kRdmaNoRecover);
        if (applier_ready_.load()) return logic_error(kReplicatingNoPause);
        if (auto at = net::parse_uri(uri); !at) return std::unexpected(at.error().wrap("source: recover"));
        std::lock_guard lock(link_.mu);
        const Phase p = state_.phase();
        if (p != Phase::paused || !link_.down)
            return logic_error(fmt::format("source: recover() during {}: only a paused post-copy can recover",
                                           to_string(p)));
        if (recover_uri_) return logic_error(fmt::format("source: recover() already asked for, to {}", *recover_uri_));
        recover_uri_ = std::move(uri);
        link_.cv.notify_all();
        return {};
    }

    // bulk_channels takes effect only before migrate() (0 leaves it as it is).
    void set_parameters(const Parameters& p) override {
        {
            std::lock_guard lock(params_mu_);
            params_ = p;
        }
        bandwidth_ = p.max_bandwidth;
        batch_ = std::clamp<std::uint32_t>(p.push_batch_pages, 1, proto::kMaxPagesPerFrame);
        std::lock_guard lock(mu_);
        if (!started_ && p.bulk_channels != 0)
            bulk_count_ = std::min<std::uint32_t>(p.bulk_channels, proto::kMaxBulkChannels);
    }

    Stats stats() const override {
        Stats s;
        s.phase = state_.phase();
        s.mode = cfg_.mode;
        s.total_pages = total_pages_;
        // RDMA: the destination read the pages itself; its COMPLETE says they all arrived.
        s.pages_present = rdma_mode_ && completed_ ? total_pages_ : stats_.sent_pages.get() - lost_in_flight_.load();
        s.pages_lost_in_flight = lost_in_flight_.load();
        s.pauses = pauses_.load();
        s.recoveries = recoveries_.load();
        s.pages_pushed = stats_.pushed_pages.get();
        s.pages_demanded = stats_.demanded_pages.get();
        s.zero_pages = stats_.zero_pages.get();
        s.requests = stats_.requests.get();
        s.bytes_sent = stats_.bytes_sent.get();
        s.bulk_channels = bulk_count_;
        s.device_state_bytes = device_bytes_.load();
        s.downtime_ms = downtime_ms_.load();
        s.elapsed_ms = started_ ? state_.elapsed_ms(start_) : 0;
        s.destination_resumed = handed_over_;
        if (auto e = state_.error()) s.error = e->message();
        if (precopy_) {
            s.rounds = precopy_->rounds();
            s.pages_resent = precopy_->pages_resent();
            s.stale_pages = precopy_->stale_pages();
            s.dirty_tracking = precopy_->method();
            s.compressed_pages = precopy_->compressed_pages();
            s.compression_ratio = precopy_->compression_ratio();
            // A stale page is counted again when it is sent again.
            s.pages_present -= std::min(s.pages_present, s.stale_pages);
        }
        {
            std::lock_guard lock(params_mu_);
            s.switchover = switchover_why_;
        }
        s.tls = transport_->security();
        s.auth = net::to_string(cfg_.security.auth);
        if (auto* a = applier_ready_.load(std::memory_order_acquire)) {
            s.epochs = s.epochs_committed = a->committed();
            s.epoch_pages = a->pages_applied();
            s.epoch_commit = a->apply_latency();
        }
        s.resumed_on_source = resumed_on_source_.load();
        s.resumed_from_epoch = resumed_from_epoch_.load();
        return s;
    }

private:
    void join() {
        std::lock_guard lock(join_mu_);
        if (thread_.joinable()) thread_.join();
    }

    // The first error stops every thread — unless it is the loss of a post-copy link,
    // which pauses (link_lost); after COMPLETE nothing fails the migration.
    void fail(const Error& e) {
        if (completed_) {
            LZ_LOG(debug, "session_error_after_complete", "side=source {}", e.message());
            return;
        }
        if (link_lost(e)) return;
        end_session(e);
    }
    // Ends the migration with `e` (if it is the first error): every wait ends.
    void end_session(const Error& e) {
        stopping_ = true;
        if (state_.record(e)) stop_all();
    }
    void stop_all() {
        stop_.signal();
        std::lock_guard lock(link_.mu);
        link_.stop.signal();
        link_.cv.notify_all();
    }

    void session() {
        auto r = run();
        // Link loss: pause, wait for recover(), resume; as often as it happens.
        while (!r) {
            fail(r.error());
            if (!link_is_down()) break;
            teardown_link();
            r = pause_and_recover();
        }
        if (r) completed_ = true;
        // The pusher may still be sending (the destination had every page before the
        // sweep ended): stop it before its socket closes.
        stop_all();
        if (pusher_) {
            pusher_->stop();  // ends a sender's wait at the demand gate
            pusher_->join();
        }
        if (rdma_) {
            const auto rep = rdma_->report();
            LZ_LOG(info, "source_rdma", "device={} on_demand={} zero_pages={} samples={}", rep.device, rep.on_demand,
                   rep.zero_pages, rep.samples);
            rdma_.reset();  // joins the scan thread, deregisters guest RAM
        }
        if (watchdog_) watchdog_->stop();
        if (replication_thread_.joinable()) replication_thread_.join();  // no epoch is applied after this
        urgent_.reset();
        bulk_.clear();
        replication_.reset();
        if (precopy_) precopy_->stop_tracking();  // before the guest may run here again
        if (auto e = state_.error()) {
            // Before GO the destination never ran the VM: it runs here again. After GO it
            // may run there: resuming it here could make two running copies — except in
            // hybrid mode, once the destination's lease has certainly lapsed.
            if (applier_ && go_sent_ && cfg_.mode == Mode::hybrid) {
                resume_from_checkpoint(*e);
            } else if (paused_ && !go_sent_ && cfg_.hooks.resume_vcpus) {
                cfg_.hooks.resume_vcpus();
                LZ_LOG(warn, "source_resumed_here", "the VM runs on the source again: {}", e->message());
            } else if (go_sent_ && !handed_over_) {
                e->context += "; GO was sent, so the destination may be running the VM: it was not resumed here";
                state_.amend(*e);
            }
            state_.set_phase(cancelled_ ? Phase::cancelled : Phase::failed, e->message());
            state_.emit(Event{Event::Kind::error, state_.phase(), e->message()});
            return;
        }
        state_.set_phase(Phase::completed,
                         fmt::format("migration completed in {:.1f} ms, downtime {:.2f} ms", api::ms_since(start_),
                                     downtime_ms_.load()),
                         Event{.downtime_ms = downtime_ms_.load()});
    }

    Result<void> run() {
        state_.set_phase(Phase::setup);
        session_id_ = std::random_device{}() | (std::uint64_t(std::random_device{}()) << 32);
        const std::uint64_t session_id = session_id_;
        auto dog = Watchdog::start(stop_.fd(), [this](const Error& e) { fail(e); });
        if (!dog) return std::unexpected(dog.error().wrap("source"));
        watchdog_ = std::move(*dog);
        const auto limit = cfg_.switchover_timeout;
        watchdog_->arm(limit, "source: the destination did not complete the handshake and region table in time");

        auto urgent = transport_->connect("urgent channel", true);
        if (!urgent) return std::unexpected(urgent.error().wrap("source"));
        urgent_ = std::move(*urgent);
        net::FrameReader ureader(*urgent_);
        if (auto r = handshake(ureader, proto::Channel::urgent, 0, session_id); !r) return r;
        if (auto r = open_link_channels(*transport_); !r) return r;
        LZ_LOG(info, "source_channels", "transport={} auth={} tls={} bulk={}", transport_->name(),
               net::to_string(cfg_.security.auth), transport_->security(), bulk_count_);

        auto table = proto::encode(proto::region_table_of(cfg_.regions));
        if (auto r = net::send_frame(*urgent_, table); !r) return r;
        if (auto r = ureader.expect(proto::Type::region_ack); !r) return std::unexpected(r.error());
        if (transport_->name() == "rdma") {
            auto rs = source::RdmaServer::setup(cfg_.regions, ureader, *net::rdma_host(cfg_.uri), session_id, stop_.fd());
            if (!rs) return std::unexpected(rs.error());
            rdma_ = std::move(*rs);
            rdma_mode_ = true;
        }

        // Everything the post-copy needs is allocated before the VM pauses: the serve
        // thread's staging buffer and the senders'. Populating them inside the downtime
        // cost up to 13 ms of it here.
        auto framer = source::PageFramer::create(cfg_.regions, *reader_);
        if (!framer) return std::unexpected(framer.error().wrap("source: urgent channel"));
        framer_ = std::move(*framer);
        gate_ = std::make_unique<source::DemandGate>();
        pusher_ = std::make_unique<source::Pusher>(cfg_.regions, *reader_, sent_, stats_,
                                                   source::PushConfig{&bandwidth_, &batch_, gate_.get(), 0});
        if (auto p = pusher_->prepare(bulk_.size()); !p) return p;

        watchdog_->disarm();
        if (precopy_)
            if (auto p = run_precopy(ureader); !p) return p;

        state_.set_phase(Phase::switchover);
        const auto paused_at = Clock::now();
        cfg_.hooks.pause_vcpus();
        paused_ = true;
        // The stale set (or stop-and-copy's last pages) goes before the device state.
        if (precopy_)
            if (auto p = precopy_->switchover(*urgent_); !p) return p;
        auto blob = cfg_.hooks.save_device_state();
        if (!blob) return std::unexpected(blob.error().wrap("source: save_device_state"));
        device_bytes_ = blob->size();
        // Hybrid: the VM stays paused here from now on, so this memory and this device
        // state are epoch 0's checkpoint, until the destination's epochs replace it.
        if (replicating()) {
            applier_ = std::make_unique<source::EpochApplier>(cfg_.regions, *blob);
            applier_ready_.store(applier_.get(), std::memory_order_release);
        }
        auto dev = proto::encode(proto::DeviceState{std::move(*blob)});
        // Two-phase: the destination says it loaded the device state, then GO lets it
        // run. Until GO leaves, any failure (this deadline included) resumes the VM here.
        watchdog_->arm(limit, "source: the destination did not confirm the device state (DEVICE_LOADED) in "
                              "time; the VM resumes on the source (the destination never ran it)");
        if (auto r = net::send_frame(*urgent_, dev); !r) return r;
        auto go = [&]() -> Result<void> {  // on DEVICE_LOADED, from the serve loop
            if (int e = failpoint::check("source_before_go", 0, 0, 0))
                return sys_error("source: failpoint source_before_go", e);
            watchdog_->arm(limit, "source: GO was sent and the destination did not report RESUMED in time");
            go_sent_ = true;
            note_renewal();  // GO answers DEVICE_LOADED: the destination's first lease anchor
            auto sent = net::send_frame(*urgent_, proto::encode_empty(proto::Type::go));
            note_renewal();
            return sent;
        };

        // From here the destination may fault: demand requests are served at once. The
        // pusher waits for RESUMED: started earlier, its bulk frames compete for the CPUs
        // with the destination's resume and stretch the downtime (2-15 ms measured here
        // against ~0.5 ms when held back).
        return source::serve_loop(ureader, *urgent_, cfg_.regions, *framer_, sent_, pusher_.get(), stats_, *gate_,
                                  [&]() -> Result<void> {
            handed_over_ = true;
            downtime_ms_ = api::ms_since(paused_at);
            watchdog_->disarm();
            watchdog_->watch(*urgent_, cfg_.parameters.heartbeat_timeout, {},
                             fmt::format("source: {}", urgent_->where()));
            state_.set_phase(Phase::postcopy, fmt::format("destination resumed after {:.2f} ms", downtime_ms_.load()),
                             Event{.downtime_ms = downtime_ms_.load()});
            if (applier_)
                if (auto r = start_replication(); !r) return r;
            // RDMA: the destination reads the pages itself; the source sends the zero bitmap.
            if (rdma_) return rdma_->start_scan(*bulk_[0], *reader_, [this](const Error& e) { fail(e); });
            std::vector<net::Channel*> bulk;
            for (auto& c : bulk_) bulk.push_back(c.get());
            return pusher_->start(std::move(bulk), [this](const Error& e) { fail(e.wrap("source: pusher")); });
        }, go, [this] { note_renewal(); }, false, [this] { return on_complete(); });
    }

    // COMPLETE was read. Hybrid with back-replication: from here this side never resumes
    // the VM (completed_: every later error is an echo of the end), and RELEASE tells the
    // destination so — its lease and held output end on RELEASE, not on COMPLETE. If
    // RELEASE cannot be sent the destination never reads it: it fences when its lease
    // lapses, and this side takes the VM back after the lease as on any link loss.
    Result<void> on_complete() {
        if (!applier_) return {};
        completed_ = true;
        if (auto r = applier_->release(*replication_); !r) {
            completed_ = false;
            return std::unexpected(r.error().wrap("source: sending RELEASE after COMPLETE"));
        }
        LZ_LOG(info, "source_release", "committed={}", applier_->committed());
        return {};
    }

    // Rounds while the VM runs here, until the policy decides (precopy/precopy.hpp). A
    // pre-copy that cannot converge within its bound ends the migration, VM still here.
    Result<void> run_precopy(net::FrameReader& ureader) {
        state_.set_phase(Phase::precopy);
        auto tracker = source::make_dirty_tracker(cfg_.regions, cfg_.dirty_tracking, cfg_.dirty_log);
        if (!tracker) return std::unexpected(tracker.error().wrap("source"));
        std::vector<net::Channel*> bulk;
        for (auto& c : bulk_) bulk.push_back(c.get());
        if (auto s = precopy_->start(std::move(*tracker), std::move(bulk)); !s) return std::unexpected(s.error().wrap("source"));
        auto v = precopy_->run_rounds(stopping_, ureader);
        if (!v) return std::unexpected(v.error().wrap("source"));
        {
            std::lock_guard lock(params_mu_);
            switchover_why_ = v->why;
        }
        state_.emit(Event{.kind = Event::Kind::info, .phase = Phase::precopy, .message = v->why});
        if (cfg_.mode == Mode::precopy && v->decision != source::Decision::converged) {
            precopy_->stop_tracking();
            const std::string text = fmt::format("pre-copy did not converge: {}; the VM keeps running on the source", v->why);
            // On every channel, ahead of its close: whichever the destination reads first
            // says why.
            const auto err = proto::encode(proto::ErrorMsg{ETIMEDOUT, text});
            for (auto& c : bulk_) (void)net::send_frame(*c, err);
            (void)net::send_frame(*urgent_, err);
            return std::unexpected(Error{ETIMEDOUT, "source: " + text});
        }
        return {};
    }

    // The channels of a link after the urgent one, at first contact and at every
    // recover: the one place that opens them (a replication channel joins here).
    Result<void> open_link_channels(net::Transport& transport) {
        std::vector<std::unique_ptr<net::Channel>> bulk;
        for (std::uint32_t i = 0; i < bulk_count_; ++i) {
            auto ch = transport.connect(fmt::format("bulk channel {}", i), false);
            if (!ch) return std::unexpected(ch.error().wrap("source"));
            net::FrameReader breader(**ch);
            if (auto r = handshake(breader, proto::Channel::bulk, i, session_id_); !r) return r;
            bulk.push_back(std::move(*ch));
        }
        bulk_ = std::move(bulk);
        // Hybrid: the replication channel, at first contact only (a replicating migration
        // does not pause: link_lost()).
        if (replicating() && &transport == transport_.get())
            if (auto r = open_replication(session_id_); !r) return r;
        return {};
    }

    // ─── Link loss: pause and recover ──────────────────────────────────────────────
    // fail() → link_lost(): a transport_lost error in post-copy (or recovering), or
    // pause(), marks the link down and signals link_.stop: every wait on this link's
    // channels ends, the session thread's serve loop returns, and session() calls
    // teardown_link() (pusher joined, heartbeats off, channels closed: the destination
    // sees the link end and pauses too), then pause_and_recover(): Phase::paused until
    // recover(uri) (→ resume(), the handshake drawn in src/protocol.hpp), cancel(), or
    // Parameters::recover_timeout (→ failed: the destination may be running the VM, so it
    // is not resumed here). The sent map and stats are kept; resume() resets the sent
    // map to what the destination lacks, and a new pusher sweeps what is unsent.

    // True when `e` pauses the migration (or is an echo of the link that already did).
    bool link_lost(const Error& e) {
        std::lock_guard lock(link_.mu);
        if (stop_.signalled()) return false;
        if (link_.down) {
            LZ_LOG(debug, "source_link_echo", "{}", e.message());
            return true;
        }
        const Phase p = state_.phase();
        // Hybrid with back-replication does not pause: the destination's lease fences it
        // and this side resumes the VM from the last committed epoch (session()).
        if (e.kind != ErrorClass::transport_lost || rdma_mode_ || cancelled_ || applier_ready_.load() ||
            (p != Phase::postcopy && p != Phase::recovering))
            return false;
        link_.lose(e, "source_link_lost");
        return true;
    }
    bool link_is_down() { return link_.is_down(stop_); }

    // Stops and joins what lives with the link; keeps the sent map and counters.
    void teardown_link() {
        if (pusher_) {
            pusher_->stop();
            pusher_->join();
            pusher_.reset();  // before its gate, which its destructor shuts
        }
        if (watchdog_) {
            watchdog_->unwatch();
            watchdog_->disarm();
        }
        urgent_.reset();
        bulk_.clear();
        link_transport_.reset();
    }

    Result<void> pause_and_recover() {
        const std::string why = link_.why();
        ++pauses_;
        state_.set_phase(Phase::paused, fmt::format("post-copy paused: {}", why));
        const auto limit = [&] {
            std::lock_guard lock(params_mu_);
            return params_.recover_timeout.count() > 0 ? params_.recover_timeout : cfg_.parameters.recover_timeout;
        }();
        std::string uri;
        {
            std::unique_lock lock(link_.mu);
            link_.cv.wait_for(lock, limit, [&] { return recover_uri_.has_value() || stop_.signalled(); });
            if (stop_.signalled()) return std::unexpected(state_.error().value_or(Error{ECANCELED, "source: stopped"}));
            if (!recover_uri_) {
                lock.unlock();
                Error e{ETIMEDOUT, fmt::format("source: post-copy paused for {} ms (recover_timeout) without "
                                               "recover() ({}); the destination may be running the VM: it was not "
                                               "resumed here", limit.count(), why)};
                end_session(e);  // gives up: not a link loss any more
                return std::unexpected(e);
            }
            uri = std::move(*recover_uri_);
            recover_uri_.reset();
            auto fresh = net::ShutdownEvent::create();
            if (!fresh) return std::unexpected(fresh.error().wrap("source: recover"));
            link_.replace(std::move(*fresh));
        }
        state_.set_phase(Phase::recovering, fmt::format("recovering: connecting to {}", uri));
        auto r = resume(uri);
        // Any failure of the handshake (a refusal too: the wrong address) goes back to
        // paused, where a later recover() may succeed.
        if (!r && !stop_.signalled()) r.error().kind = ErrorClass::transport_lost;
        if (!r) return r;
        return serve_resumed();
    }

    // The resume handshake (src/protocol.hpp): RESUME, LACKING..., LACKING_END, then the
    // other channels. Every failure here goes back to paused.
    Result<void> resume(const std::string& uri) {
        int link_fd;
        {
            std::lock_guard lock(link_.mu);
            link_fd = link_.stop.fd();
        }
        auto transport = net::tcp_connector(uri, link_fd, cfg_.connect_timeout, tls_);
        if (!transport) return std::unexpected(transport.error().wrap("source: recover"));
        link_transport_ = std::move(*transport);
        watchdog_->arm(cfg_.switchover_timeout, fmt::format("source: recover: the destination at {} did not finish "
                                                            "the resume handshake in time", uri));
        auto urgent = link_transport_->connect("urgent channel", true);
        if (!urgent) return std::unexpected(urgent.error().wrap("source: recover"));
        urgent_ = std::move(*urgent);
        ureader_ = std::make_unique<net::FrameReader>(*urgent_);
        if (int e = failpoint::check("recover_handshake", 0, 0, 0))
            return transport_error("source: recover: failpoint recover_handshake", e);
        auto hello = proto::encode(proto::Resume{.session = session_id_,
                                                 .bulk_channels = static_cast<std::uint8_t>(bulk_count_.load())});
        if (auto r = net::send_frame(*urgent_, hello); !r) return std::unexpected(r.error().wrap("source: recover"));
        // What the destination lacks is all that may still need sending.
        std::uint64_t lacking = 0, unsent = 0;
        for (;;) {
            auto h = ureader_->next();
            if (!h) return std::unexpected(h.error().wrap("source: recover"));
            if (!*h) return transport_error(fmt::format("source: recover: {}: the destination closed the connection "
                                                        "before LACKING_END", ureader_->where()), ECONNRESET);
            auto payload = ureader_->read_control(**h);
            if (!payload) return std::unexpected(payload.error());
            if ((*h)->type == proto::Type::error) return std::unexpected(net::peer_error(*payload, ureader_->where()));
            if ((*h)->type == proto::Type::lacking_end) {
                auto end = proto::decode_lacking_end(*payload);
                if (!end) return std::unexpected(end.error().wrap(ureader_->where()));
                if (end->pages != lacking)
                    return peer_violation(fmt::format("{}: LACKING_END says {} pages, the runs held {}",
                                                      ureader_->where(), end->pages, lacking));
                break;
            }
            if ((*h)->type != proto::Type::lacking)
                return peer_violation(fmt::format("{}: unexpected {} in the resume handshake", ureader_->where(),
                                                  proto::to_string((*h)->type)));
            auto set = proto::decode_lacking(*payload);
            if (!set) return std::unexpected(set.error().wrap(ureader_->where()));
            for (const auto& run : set->runs) {
                const auto& g = cfg_.regions;
                const std::uint64_t pages = run.region < g.size() ? g[run.region].size / g[run.region].page_size : 0;
                if (run.region >= g.size() || run.first > pages || run.count > pages - run.first)
                    return peer_violation(fmt::format("{}: LACKING pages {}..{} of region {}, which has {} pages",
                                                      ureader_->where(), run.first,
                                                      proto::last_page(run.first, run.count), run.region, pages));
                lacking += run.count;
                // Reset the sent map: a page sent but lacking there was lost in flight.
                for (std::uint64_t p = run.first; p < run.first + run.count; ++p)
                    if (sent_.sent(run.region, p)) {
                        sent_.unmark(run.region, p);
                        ++unsent;
                    }
            }
        }
        lost_in_flight_ += unsent;
        LZ_LOG(info, "source_resume", "lacking={} lost_in_flight={}", lacking, unsent);
        if (auto r = open_link_channels(*link_transport_); !r) return r;
        gate_ = std::make_unique<source::DemandGate>();
        pusher_ = std::make_unique<source::Pusher>(cfg_.regions, *reader_, sent_, stats_,
                                                   source::PushConfig{&bandwidth_, &batch_, gate_.get(), 0});
        if (auto p = pusher_->prepare(bulk_.size()); !p) return p;
        watchdog_->disarm();
        watchdog_->watch(*urgent_, cfg_.parameters.heartbeat_timeout, {}, fmt::format("source: {}", urgent_->where()));
        std::vector<net::Channel*> bulk;
        for (auto& c : bulk_) bulk.push_back(c.get());
        if (auto p = pusher_->start(std::move(bulk), [this](const Error& e) { fail(e.wrap("source: pusher")); }); !p)
            return p;
        return {};
    }

    // Post-copy again on the new link, until COMPLETE or the next failure.
    Result<void> serve_resumed() {
        ++recoveries_;
        state_.set_phase(Phase::postcopy, "post-copy resumed after recover");
        return source::serve_loop(*ureader_, *urgent_, cfg_.regions, *framer_, sent_, pusher_.get(), stats_, *gate_,
                                  {}, {}, {}, /*resumed=*/true);
    }

    bool replicating() const { return cfg_.mode == Mode::hybrid && cfg_.parameters.epoch_ms != 0; }

    // Hybrid: opens and authenticates the replication channel (at setup; the recovery
    // path calls it again to reopen it).
    Result<void> open_replication(std::uint64_t session_id) {
        auto ch = transport_->connect("replication channel", false);
        if (!ch) return std::unexpected(ch.error().wrap("source"));
        net::FrameReader reader(**ch);
        if (auto r = handshake(reader, proto::Channel::replication, 0, session_id); !r) return r;
        replication_ = std::move(*ch);
        return {};
    }

    // From RESUMED: the replication thread receives and applies the destination's epochs.
    Result<void> start_replication() {
        try {
            replication_thread_ = std::thread([this] {
                api::SessionState::current = this;
                net::FrameReader reader(*replication_);
                auto r = applier_->run(reader, [this] { note_renewal(); });
                if (!r) fail(r.error().wrap("source: back-replication"));
            });
        } catch (const std::system_error& e) {
            return sys_error("source: starting the replication thread", e.code().value());
        }
        return {};
    }

    // The source sent something that renews the destination's lease (GO, a heartbeat
    // echo, an EPOCH_ACK): the failover deadline counts from the last one.
    void note_renewal() {
        last_renewal_ns_.store(Clock::now().time_since_epoch().count(), std::memory_order_release);
    }

    // Hybrid, after GO, the destination lost (link down, killed, fenced, cancelled): the
    // VM resumes here from the last committed epoch once the destination's lease has
    // certainly expired.
    //
    // Clock assumption: both hosts measure the lease with a monotonic clock
    // (CLOCK_MONOTONIC, steady_clock) whose rates differ by at most kLeaseDriftBound
    // over a lease. The destination anchors each renewal at its own send time of what
    // the source answered — before the source sent the answer — and fences once
    // lease_ms passed on its clock. This side's last renewal left at last_renewal_ns_,
    // after the anchor; so lease × (1 + drift bound) later on this clock the destination
    // has fenced, and kLeaseMargin covers the time its fence takes (pause_vcpus). Nothing
    // ends this wait early (cancel() included): two running copies are worse than a late
    // resume.
    void resume_from_checkpoint(Error& e) {
        const auto lease = std::chrono::duration<double, std::milli>(cfg_.parameters.lease_ms * (1 + kLeaseDriftBound));
        const auto last = Clock::time_point(Clock::duration(last_renewal_ns_.load(std::memory_order_acquire)));
        const auto until = last + std::chrono::duration_cast<Clock::duration>(lease) + kLeaseMargin;
        LZ_LOG(warn, "source_failover_wait", "epoch={} wait_ms={:.1f}", applier_->committed(),
               std::chrono::duration<double, std::milli>(until - Clock::now()).count());
        std::this_thread::sleep_until(until);  // a deadline, not a synchronisation: see above
        const std::uint64_t n = applier_->committed();
        if (cfg_.hooks.load_device_state) {
            const auto blob = applier_->checkpoint();
            if (auto l = cfg_.hooks.load_device_state(blob); !l) {
                e.context += fmt::format("; the VM could not be resumed on the source from epoch {}: load_device_state: {}",
                                         n, l.error().message());
                state_.amend(e);
                return;
            }
        }
        cfg_.hooks.resume_vcpus();
        resumed_from_epoch_ = n;
        resumed_on_source_ = true;
        LZ_LOG(warn, "source_resumed_from_checkpoint", "epoch={} {}", n, e.message());
        e.context += fmt::format("; the VM resumed on the source from epoch {}", n);
        state_.amend(e);
    }

    Result<void> handshake(net::FrameReader& reader, proto::Channel ch, std::uint32_t index, std::uint64_t id) {
        auto hello = proto::encode(proto::Hello{.version = proto::kVersion, .channel = ch, .mode = cfg_.mode,
                                                .index = static_cast<std::uint8_t>(index),
                                                .bulk_channels = static_cast<std::uint8_t>(bulk_count_.load()),
                                                .session = id});
        if (auto r = net::send_frame(reader.channel(), hello); !r) return r;
        auto ack = reader.expect(proto::Type::hello_ack);
        if (!ack) return std::unexpected(ack.error());
        if (auto a = proto::decode_hello_ack(*ack); !a) return std::unexpected(a.error().wrap(reader.where()));
        return {};
    }

    static constexpr const char* kReplicatingNoPause =
        "source: a hybrid post-copy with back-replication does not pause or recover in this build: when the link "
        "is lost the VM resumes here from the last committed epoch once the destination's lease has lapsed "
        "(epoch_ms 0 on both sides: a hybrid that pauses and recovers like a post-copy)";
    static constexpr const char* kRdmaNoRecover =
        "source: an RDMA post-copy cannot pause or recover in this build (its queue pairs are not re-established); "
        "use a tcp: URI for a recoverable post-copy";

    SourceConfig cfg_;
    std::unique_ptr<net::Transport> transport_;  // the first link's (stats: security())
    net::ShutdownEvent stop_;
    // Link loss (section above). link_.stop is replaced for each new link, under link_.mu.
    api::Link link_;
    std::optional<std::string> recover_uri_;
    std::shared_ptr<net::TlsContext> tls_;
    std::unique_ptr<net::Transport> link_transport_;  // a recovered link's
    std::unique_ptr<net::FrameReader> ureader_;       // a recovered link's urgent channel
    std::unique_ptr<source::PageFramer> framer_;
    std::uint64_t session_id_ = 0;
    std::atomic<std::uint64_t> lost_in_flight_{0};
    std::atomic<std::uint32_t> pauses_{0}, recoveries_{0};
    api::SessionState state_;
    source::SentMap sent_;
    std::unique_ptr<source::PageReader> reader_;
    // Raised by the serve loop while a demand request is in service; a new one per link
    // (the pusher's stop() shuts it for good).
    std::unique_ptr<source::DemandGate> gate_;
    source::SourceStats stats_;
    std::unique_ptr<source::Pusher> pusher_;
    std::unique_ptr<source::RdmaServer> rdma_;  // rdma: URIs only
    std::atomic<bool> rdma_mode_{false};
    std::unique_ptr<source::Precopy> precopy_;  // modes precopy and hybrid; made by migrate()
    mutable std::mutex params_mu_;
    Parameters params_;
    std::string switchover_why_;
    std::atomic<bool> stopping_{false};
    std::atomic<std::uint64_t> bandwidth_{0};
    std::atomic<std::uint32_t> batch_{256};
    std::uint64_t total_pages_ = 0;
    std::atomic<std::uint32_t> bulk_count_{1};
    std::atomic<std::uint64_t> device_bytes_{0};
    std::atomic<double> downtime_ms_{0};
    std::atomic<bool> started_{false}, cancelled_{false}, paused_{false}, handed_over_{false}, completed_{false};
    std::atomic<bool> go_sent_{false};  // from here the destination may run the VM
    std::unique_ptr<Watchdog> watchdog_;
    // Hybrid: the replication channel, its thread and the epoch applier (from switchover).
    std::unique_ptr<net::Channel> replication_;
    std::unique_ptr<source::EpochApplier> applier_;
    std::atomic<source::EpochApplier*> applier_ready_{nullptr};
    std::thread replication_thread_;
    std::atomic<Clock::rep> last_renewal_ns_{0};
    std::atomic<bool> resumed_on_source_{false};
    std::atomic<std::uint64_t> resumed_from_epoch_{0};
    // Closed only after the pusher has stopped.
    std::unique_ptr<net::Channel> urgent_;
    std::vector<std::unique_ptr<net::Channel>> bulk_;
    Clock::time_point start_{};
    std::mutex mu_, join_mu_;
    std::thread thread_;
};

}  // namespace

Result<std::unique_ptr<Source>> Source::create(SourceConfig config) {
    if (auto v = validate_regions(config.regions, "source"); !v) return std::unexpected(v.error());
    if (!config.hooks.pause_vcpus || !config.hooks.resume_vcpus || !config.hooks.save_device_state)
        return logic_error("source: hooks pause_vcpus, resume_vcpus and save_device_state are required");
    if (config.mode == Mode::invalid) return logic_error("source: mode is invalid");
    if (config.switchover_timeout.count() <= 0 || config.parameters.heartbeat_timeout.count() <= 0)
        return logic_error("source: switchover_timeout and parameters.heartbeat_timeout must be positive");
    if (config.parameters.bulk_channels > proto::kMaxBulkChannels)
        return logic_error(fmt::format("source: bulk_channels {} is more than the {} this build supports",
                                       config.parameters.bulk_channels, proto::kMaxBulkChannels));
    if (config.mode != Mode::postcopy) {
        // The dirty tracking pre-copy needs, probed now: a refusal names what is missing.
        if (config.dirty_tracking == DirtyTracking::vmm && !config.dirty_log)
            return logic_error("source: dirty tracking vmm needs SourceConfig::dirty_log");
        if (auto p = source::probe_dirty_tracking(config.regions, config.dirty_tracking); !p)
            return std::unexpected(p.error().wrap("source"));
    }
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    auto link_stop = net::ShutdownEvent::create();
    if (!link_stop) return std::unexpected(link_stop.error());
    if (config.parameters.recover_timeout.count() <= 0)
        return logic_error("source: parameters.recover_timeout must be positive");
    auto tls = net::tls_for(config.security, false);
    if (!tls) return std::unexpected(tls.error().wrap("source"));
    // An rdma: URI gets RDMA or an error that says why, never TCP instead. Its one TCP
    // bulk channel carries the zero bitmap; the pages move by RDMA READ.
    const bool rdma = net::is_rdma_uri(config.uri);
    if (rdma && config.mode != Mode::postcopy)
        return logic_error(fmt::format("source: mode {} over {}: RDMA carries post-copy only in this build; "
                                       "use a tcp: URI for pre-copy and hybrid", to_string(config.mode), config.uri));
    if (rdma) config.parameters.bulk_channels = 1;
    auto transport = rdma ? net::rdma_connector(config.uri, link_stop->fd(), config.connect_timeout, *tls)
                          : net::tcp_connector(config.uri, link_stop->fd(), config.connect_timeout, *tls);
    if (!transport) return std::unexpected(transport.error().wrap("source"));
    // Probes each region's read method now, so a refusal names the region before migrate().
    auto reader = source::make_page_reader(config.regions, config.read_pages);
    if (!reader) return std::unexpected(reader.error().wrap("source"));
    return std::make_unique<SourceImpl>(std::move(config), std::move(*transport), std::move(*stop),
                                        std::move(*link_stop), std::move(*tls), std::move(*reader));
}

}  // namespace lazymig
