// The destination endpoint: listen, hand over, run post-copy until every page is here.
//
// Threads: the session thread (accepts, handshakes, loads device state, resumes the
// VM, then receives the urgent channel), the bulk receiver, and the pager's fault
// thread. One shutdown eventfd stops all three; the first error wins.
//
// Small frames the destination sends on the urgent channel (acks, PAGE_REQUEST from
// the fault thread, COMPLETE from whichever thread placed the last page) go out with
// one blocking send(2) under a mutex: three threads send them, each is tens of bytes
// that the socket buffer takes at once, and a ring per sending thread would cost more
// than it saves. Everything received, and all page data, moves through io_uring.
#include <sys/socket.h>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/api/session.hpp"
#include "src/net/frames.hpp"
#include "src/net/socket.hpp"

namespace lazymig {
namespace {

using Clock = std::chrono::steady_clock;

class DestinationImpl final : public Destination {
public:
    DestinationImpl(DestinationConfig config, std::unique_ptr<pager::Pager> pager, net::Fd listener,
                    net::Endpoint local, net::ShutdownEvent stop)
        : cfg_(std::move(config)), pager_(std::move(pager)), listener_(std::move(listener)),
          local_(std::move(local)), stop_(std::move(stop)), state_(cfg_.hooks, "destination") {}

    Result<void> start() {
        pager_->on_complete([this] { maybe_send_complete(); });
        try {
            thread_ = std::thread([this] { session(); });
        } catch (const std::system_error& e) {
            return sys_error("destination: starting the session thread", e.code().value());
        }
        return {};
    }

    ~DestinationImpl() override {
        stop_.signal();
        join();
    }

    std::string local_uri() const override { return local_.uri(); }

    void set_vcpu_threads(std::vector<VcpuThread> threads) override {
        std::lock_guard lock(vcpu_mu_);
        vcpus_ = std::move(threads);
    }

    Result<void> wait() override {
        join();
        if (auto e = state_.error()) return std::unexpected(*e);
        return {};
    }

    void cancel() override {
        fail(Error{ECANCELED, "destination: migration cancelled"});
        join();
    }

    void set_parameters(const Parameters& p) override { pager_->set_prefetch(p.prefetch_pages); }

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
        s.bytes_received = bytes_received_.load();
        s.device_state_bytes = device_bytes_.load();
        s.fault_latency = ps.fault_latency.summary();
        if (accepted_) s.elapsed_ms = state_.elapsed_ms(accepted_at_);
        s.destination_resumed = resumed_;
        s.pages_missing = pages_missing_.load();
        s.postcopy_ms = postcopy_ms_.load();
        if (s.postcopy_ms == 0 && resumed_) s.postcopy_ms = api::ms_since(resumed_at_);
        if (auto e = state_.error()) s.error = e->message();
        return s;
    }

private:
    void join() {
        std::lock_guard lock(join_mu_);
        if (thread_.joinable()) thread_.join();
        if (bulk_thread_.joinable()) bulk_thread_.join();
    }

    // The first error stops every thread. Once every page is present nothing can fail
    // the migration any more: later errors are echoes of the channels closing, and a
    // cancel() then changes nothing.
    void fail(const Error& e) {
        if (pager_->complete()) {
            LZ_LOG(debug, "session_error_after_complete", "side=destination {}", e.message());
            return;
        }
        if (state_.record(e)) stop_.signal();
    }

    Result<void> send_small(const proto::Frame& f, std::string_view what) {
        std::lock_guard lock(urgent_mu_);
        std::size_t off = 0;
        while (off < f.size()) {
            const ssize_t n = ::send(urgent_.get(), f.data() + off, f.size() - off, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return sys_error(fmt::format("urgent channel: sending {}", what));
            off += static_cast<std::size_t>(n);
        }
        return {};
    }

    // COMPLETE goes out once, after RESUMED, from whichever thread sees both conditions:
    // pages pushed before the VM resumed can complete a small VM early.
    void maybe_send_complete() {
        if (!resumed_sent_.load() || !pager_->complete() || complete_sent_.exchange(true)) return;
        postcopy_ms_ = api::ms_since(resumed_at_);
        if (auto r = send_small(proto::encode_empty(proto::Type::complete), "COMPLETE"); !r) fail(r.error());
    }

    void session() {
        auto r = run();
        if (!r) fail(r.error());
        pager_->stop();
        stop_.signal();  // the bulk receiver ends on EOF after success; make sure either way
        if (bulk_thread_.joinable()) bulk_thread_.join();
        if (pager_->complete()) {
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
            // The VM ran here and pages are missing: it cannot continue. Poison what never
            // arrived (a touch raises SIGBUS, never reads zeroes) and stop the vCPUs.
            const std::uint64_t missing = pager_->total_pages() - pager_->present_pages();
            pages_missing_ = missing;
            auto poisoned = pager_->poison_missing();
            cfg_.hooks.pause_vcpus();
            e.context = fmt::format("{}; the VM cannot continue: {} of {} pages never arrived{}", e.context, missing,
                                    pager_->total_pages(),
                                    poisoned ? " (poisoned: a touch raises SIGBUS)" : "; " + poisoned.error().message());
            state_.amend(e);
        }
        const std::string text = e.message();
        state_.set_phase(e.code == ECANCELED ? Phase::cancelled : Phase::failed, text,
                         Event{.pages_missing = pages_missing_.load()});
        state_.emit(Event{.kind = Event::Kind::error, .phase = state_.phase(), .message = text,
                          .pages_missing = pages_missing_.load()});
    }

    Result<void> run() {
        auto ring = net::Ring::create(stop_.fd());
        if (!ring) return std::unexpected(ring.error());
        auto urgent = net::accept_tcp(listener_.get(), stop_.fd(), std::chrono::milliseconds(-1));
        if (!urgent) return std::unexpected(urgent.error().wrap("destination: urgent channel"));
        if (auto r = net::set_nodelay(urgent->get()); !r) return r;
        urgent_ = std::move(*urgent);
        accepted_at_ = Clock::now();
        accepted_ = true;
        state_.set_phase(Phase::setup);
        const std::string uwhere = "urgent channel from the source";
        net::FrameReader ureader(*ring, urgent_.get(), uwhere);
        auto hello = accept_hello(ureader, proto::Channel::urgent,
                                  [&](const proto::Frame& f) { return send_small(f, "handshake reply"); });
        if (!hello) return std::unexpected(hello.error());
        session_id_ = hello->session;
        mode_ = hello->mode;

        auto bulk = net::accept_tcp(listener_.get(), stop_.fd(), std::chrono::milliseconds(30'000));
        if (!bulk) return std::unexpected(bulk.error().wrap("destination: bulk channel"));
        bulk_ = std::move(*bulk);
        listener_.reset();
        bulk_thread_ = std::thread([this] {
            if (auto r = receive_bulk(); !r) fail(r.error());
        });

        auto table_raw = ureader.expect(proto::Type::region_table);
        if (!table_raw) return std::unexpected(table_raw.error());
        auto table = proto::decode_region_table(*table_raw);
        if (!table) return refuse(table.error().wrap(uwhere));
        if (auto c = proto::check_region_table(*table, pager_->guest_regions()); !c) return refuse(c.error());
        if (auto r = send_small(proto::encode_empty(proto::Type::region_ack), "REGION_ACK"); !r) return r;

        auto dev = ureader.expect(proto::Type::device_state);
        if (!dev) return std::unexpected(dev.error());
        state_.set_phase(Phase::switchover);
        device_bytes_ = dev->size();
        if (cfg_.hooks.load_device_state)
            if (auto l = cfg_.hooks.load_device_state(*dev); !l) return refuse(l.error().wrap("load_device_state"));
        if (auto s = pager_->start([this](const proto::PageRequest& req) { return send_small(proto::encode(req), "PAGE_REQUEST"); },
                                   [this](const Error& e) { fail(e); });
            !s)
            return s;
        cfg_.hooks.resume_vcpus();
        resumed_at_ = Clock::now();
        resumed_ = true;
        if (auto r = send_small(proto::encode_empty(proto::Type::resumed), "RESUMED"); !r) return r;
        resumed_sent_ = true;
        state_.set_phase(Phase::postcopy);
        maybe_send_complete();

        auto r = pager::receive_loop(ureader, *pager_, true, [&](const proto::Header& h, std::vector<std::byte> p) -> Result<bool> {
            if (h.type == proto::Type::error) return std::unexpected(net::peer_error(p, uwhere));
            return logic_error(fmt::format("{}: unexpected {} during post-copy", uwhere, proto::to_string(h.type)));
        });
        bytes_received_ += ureader.bytes_read();
        if (!r) return r;
        if (!pager_->complete())
            return sys_error(fmt::format("{}: the source closed the connection", uwhere), ECONNRESET);
        return {};
    }

    using Reply = std::function<Result<void>(const proto::Frame&)>;
    Result<proto::Hello> accept_hello(net::FrameReader& reader, proto::Channel want, const Reply& send_on) {
        auto raw = reader.expect(proto::Type::hello);
        if (!raw) return std::unexpected(raw.error());
        auto hello = proto::decode_hello(*raw);
        if (!hello) {
            auto e = hello.error().wrap(reader.where());
            (void)send_on(proto::encode(proto::ErrorMsg{0, hello.error().context}));
            return std::unexpected(e);
        }
        if (hello->channel != want) {
            auto e = Error{0, fmt::format("{}: HELLO for the {} channel where the {} channel was expected",
                                          reader.where(), proto::to_string(hello->channel), proto::to_string(want))};
            (void)send_on(proto::encode(proto::ErrorMsg{0, e.context}));
            return std::unexpected(e);
        }
        if (want == proto::Channel::bulk && hello->session != session_id_) {
            auto e = Error{0, fmt::format("{}: HELLO from another migration (session {:#x}, expected {:#x})",
                                          reader.where(), hello->session, session_id_)};
            (void)send_on(proto::encode(proto::ErrorMsg{0, e.context}));
            return std::unexpected(e);
        }
        if (auto r = send_on(proto::encode(proto::HelloAck{})); !r) return std::unexpected(r.error());
        return *hello;
    }

    // Tells the source why, then fails with the same words.
    std::unexpected<Error> refuse(const Error& e) {
        (void)send_small(proto::encode(proto::ErrorMsg{0, e.message()}), "ERROR");
        return std::unexpected(e);
    }

    Result<void> receive_bulk() {
        auto ring = net::Ring::create(stop_.fd());
        if (!ring) return std::unexpected(ring.error());
        net::FrameReader reader(*ring, bulk_.get(), "bulk channel from the source");
        auto hello = accept_hello(reader, proto::Channel::bulk, [&](const proto::Frame& f) {
            return net::send_frame(*ring, bulk_.get(), f, reader.where());
        });
        if (!hello) return std::unexpected(hello.error());
        auto r = pager::receive_loop(reader, *pager_, false, [&](const proto::Header& h, std::vector<std::byte> p) -> Result<bool> {
            if (h.type == proto::Type::push_done) return true;
            if (h.type == proto::Type::error) return std::unexpected(net::peer_error(p, reader.where()));
            return logic_error(fmt::format("{}: unexpected {}", reader.where(), proto::to_string(h.type)));
        });
        bytes_received_ += reader.bytes_read();
        if (!r) return r;
        if (!pager_->complete())
            return sys_error(fmt::format("{}: the source closed the connection", reader.where()), ECONNRESET);
        return {};
    }

    DestinationConfig cfg_;
    std::unique_ptr<pager::Pager> pager_;
    net::Fd listener_, urgent_, bulk_;
    net::Endpoint local_;
    net::ShutdownEvent stop_;
    api::SessionState state_;
    std::mutex urgent_mu_, join_mu_, vcpu_mu_;
    std::vector<VcpuThread> vcpus_;
    std::thread thread_, bulk_thread_;
    std::uint64_t session_id_ = 0;
    std::atomic<Mode> mode_{Mode::invalid};
    std::atomic<std::uint64_t> bytes_received_{0}, device_bytes_{0}, pages_missing_{0};
    std::atomic<double> postcopy_ms_{0};
    std::atomic<bool> accepted_{false}, resumed_{false}, resumed_sent_{false}, complete_sent_{false};
    Clock::time_point accepted_at_{}, resumed_at_{};
};

}  // namespace

Result<std::unique_ptr<Destination>> Destination::listen(DestinationConfig config) {
    if (!config.hooks.pause_vcpus || !config.hooks.resume_vcpus)
        return logic_error("destination: hooks pause_vcpus and resume_vcpus are required");
    auto at = net::parse_uri(config.uri);
    if (!at) return std::unexpected(at.error().wrap("destination"));
    auto pager = pager::Pager::create(config.regions, config.parameters.prefetch_pages);
    if (!pager) return std::unexpected(pager.error());
    auto listener = net::listen_tcp(*at);
    if (!listener) return std::unexpected(listener.error().wrap("destination"));
    auto local = net::local_endpoint(listener->get());
    if (!local) return std::unexpected(local.error());
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    auto d = std::make_unique<DestinationImpl>(std::move(config), std::move(*pager), std::move(*listener),
                                               std::move(*local), std::move(*stop));
    if (auto s = d->start(); !s) return std::unexpected(s.error());
    return d;
}

}  // namespace lazymig
