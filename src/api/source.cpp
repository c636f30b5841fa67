// The source endpoint: connect, handshake, switchover, then serve and push.
//
// Threads: the session thread (connects, hands over, then serves the urgent channel)
// and the pusher's. cancel()/wait()/~SourceImpl stop both through one shutdown eventfd.
#include <random>

#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/api/session.hpp"
#include "src/net/frames.hpp"
#include "src/net/socket.hpp"
#include "src/region.hpp"

namespace lazymig {
namespace {

using Clock = std::chrono::steady_clock;

class SourceImpl final : public Source {
public:
    SourceImpl(SourceConfig config, net::Endpoint to, net::ShutdownEvent stop)
        : cfg_(std::move(config)), to_(std::move(to)), stop_(std::move(stop)), state_(cfg_.hooks, "source"),
          sent_(cfg_.regions) {
        bandwidth_ = cfg_.parameters.max_bandwidth;
        batch_ = cfg_.parameters.push_batch_pages;
        for (const auto& r : cfg_.regions) total_pages_ += r.size / r.page_size;
    }
    ~SourceImpl() override {
        stop_.signal();
        join();
    }

    Result<void> migrate() override {
        std::lock_guard lock(mu_);
        if (started_) return logic_error("source: migrate() was already called for this migration");
        if (cfg_.mode != Mode::postcopy)
            return logic_error(fmt::format("source: mode {} is not available yet; this build migrates postcopy",
                                           to_string(cfg_.mode)));
        started_ = true;
        start_ = Clock::now();
        try {
            thread_ = std::thread([this] { session(); });
        } catch (const std::system_error& e) {
            return sys_error("source: starting the session thread", e.code().value());
        }
        return {};
    }

    Result<void> wait() override {
        join();
        if (auto e = state_.error()) return std::unexpected(*e);
        if (!started_) return logic_error("source: wait() before migrate()");
        return {};
    }

    void cancel() override {
        if (!completed_) {
            cancelled_ = true;
            fail(Error{ECANCELED, "source: migration cancelled"});
        }
        join();
    }

    void set_parameters(const Parameters& p) override {
        bandwidth_ = p.max_bandwidth;
        batch_ = std::clamp<std::uint32_t>(p.push_batch_pages, 1, proto::kMaxPagesPerFrame);
    }

    Stats stats() const override {
        Stats s;
        s.phase = state_.phase();
        s.mode = cfg_.mode;
        s.total_pages = total_pages_;
        s.pages_present = stats_.sent_pages.get();
        s.pages_pushed = stats_.pushed_pages.get();
        s.pages_demanded = stats_.demanded_pages.get();
        s.zero_pages = stats_.zero_pages.get();
        s.requests = stats_.requests.get();
        s.bytes_sent = stats_.bytes_sent.get();
        s.device_state_bytes = device_bytes_.load();
        s.downtime_ms = downtime_ms_.load();
        s.elapsed_ms = started_ ? state_.elapsed_ms(start_) : 0;
        s.destination_resumed = handed_over_;
        if (auto e = state_.error()) s.error = e->message();
        return s;
    }

private:
    void join() {
        std::lock_guard lock(join_mu_);
        if (thread_.joinable()) thread_.join();
    }

    // The first error stops both threads; after COMPLETE nothing fails the migration.
    void fail(const Error& e) {
        if (completed_) {
            LZ_LOG(debug, "session_error_after_complete", "side=source {}", e.message());
            return;
        }
        if (state_.record(e)) stop_.signal();
    }

    void session() {
        auto r = run();
        if (r) completed_ = true;
        else fail(r.error());
        // The pusher may still be sending (the destination had every page before the
        // sweep ended): stop it before its socket closes.
        stop_.signal();
        if (pusher_) pusher_->join();
        urgent_.reset();
        bulk_.reset();
        if (auto e = state_.error()) {
            // Before the destination resumed the VM runs here again; after, it cannot.
            if (paused_ && !handed_over_ && cfg_.hooks.resume_vcpus) cfg_.hooks.resume_vcpus();
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
        auto ring = net::Ring::create(stop_.fd());
        if (!ring) return std::unexpected(ring.error());
        const std::uint64_t session_id = std::random_device{}() | (std::uint64_t(std::random_device{}()) << 32);

        auto connected = net::connect_tcp(to_, stop_.fd(), cfg_.connect_timeout, true);
        if (!connected) return std::unexpected(connected.error().wrap("source: urgent channel"));
        urgent_ = std::move(*connected);
        net::Fd* urgent = &urgent_;
        const std::string uwhere = fmt::format("urgent channel to {}", to_.uri());
        net::FrameReader ureader(*ring, urgent->get(), uwhere);
        if (auto r = handshake(*ring, ureader, urgent->get(), proto::Channel::urgent, session_id); !r) return r;

        connected = net::connect_tcp(to_, stop_.fd(), cfg_.connect_timeout, false);
        if (!connected) return std::unexpected(connected.error().wrap("source: bulk channel"));
        bulk_ = std::move(*connected);
        net::Fd* bulk = &bulk_;
        net::FrameReader breader(*ring, bulk->get(), fmt::format("bulk channel to {}", to_.uri()));
        if (auto r = handshake(*ring, breader, bulk->get(), proto::Channel::bulk, session_id); !r) return r;

        auto table = proto::encode(proto::region_table_of(cfg_.regions));
        if (auto r = net::send_frame(*ring, urgent->get(), table, uwhere); !r) return r;
        if (auto r = ureader.expect(proto::Type::region_ack); !r) return std::unexpected(r.error());

        state_.set_phase(Phase::switchover);
        const auto paused_at = Clock::now();
        cfg_.hooks.pause_vcpus();
        paused_ = true;
        auto blob = cfg_.hooks.save_device_state();
        if (!blob) return std::unexpected(blob.error().wrap("source: save_device_state"));
        device_bytes_ = blob->size();
        auto dev = proto::encode(proto::DeviceState{std::move(*blob)});
        if (auto r = net::send_frame(*ring, urgent->get(), dev, uwhere); !r) return r;

        // From here the destination may fault: demand requests are served at once. The
        // pusher waits for RESUMED: started earlier, its bulk frames compete for the CPUs
        // with the destination's resume and stretch the downtime (2-15 ms measured here
        // against ~0.5 ms when held back).
        pusher_ = std::make_unique<source::Pusher>(cfg_.regions, sent_, hints_, stats_,
                                                   source::PushConfig{&bandwidth_, &batch_});
        return source::serve_loop(ureader, *ring, urgent->get(), cfg_.regions, sent_, hints_, stats_,
                                  [&]() -> Result<void> {
            handed_over_ = true;
            downtime_ms_ = api::ms_since(paused_at);
            state_.set_phase(Phase::postcopy, fmt::format("destination resumed after {:.2f} ms", downtime_ms_.load()),
                             Event{.downtime_ms = downtime_ms_.load()});
            return pusher_->start(bulk->get(), stop_.fd(), [this](const Error& e) { fail(e.wrap("source: pusher")); });
        });
    }

    Result<void> handshake(net::Ring& ring, net::FrameReader& reader, int fd, proto::Channel ch, std::uint64_t id) {
        auto hello = proto::encode(proto::Hello{.version = proto::kVersion, .channel = ch, .mode = cfg_.mode,
                                                .session = id});
        if (auto r = net::send_frame(ring, fd, hello, reader.where()); !r) return r;
        auto ack = reader.expect(proto::Type::hello_ack);
        if (!ack) return std::unexpected(ack.error());
        if (auto a = proto::decode_hello_ack(*ack); !a) return std::unexpected(a.error().wrap(reader.where()));
        return {};
    }

    SourceConfig cfg_;
    net::Endpoint to_;
    net::ShutdownEvent stop_;
    api::SessionState state_;
    source::SentMap sent_;
    source::HintQueue hints_;
    source::SourceStats stats_;
    std::unique_ptr<source::Pusher> pusher_;
    std::atomic<std::uint64_t> bandwidth_{0};
    std::atomic<std::uint32_t> batch_{256};
    std::uint64_t total_pages_ = 0;
    std::atomic<std::uint64_t> device_bytes_{0};
    std::atomic<double> downtime_ms_{0};
    std::atomic<bool> started_{false}, cancelled_{false}, paused_{false}, handed_over_{false}, completed_{false};
    net::Fd urgent_, bulk_;  // closed only after the pusher has stopped
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
    auto to = net::parse_uri(config.uri);
    if (!to) return std::unexpected(to.error().wrap("source"));
    if (to->port == 0) return logic_error(fmt::format("source: uri '{}' needs the destination's port", config.uri));
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    return std::make_unique<SourceImpl>(std::move(config), std::move(*to), std::move(*stop));
}

}  // namespace lazymig
