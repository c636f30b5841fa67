// TCP channels over io_uring: the first implementation of the transport seam.
//
// Each channel owns its socket and two rings, one per direction, so the receiving
// thread and the sending thread block independently. A ring's single pending operation
// and the shared shutdown poll are all it ever has in flight.
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <deque>

#include <fmt/format.h>

#include "src/net/channel.hpp"
#include "src/net/ring.hpp"
#include "src/net/socket.hpp"
#include "src/net/tls.hpp"
#include "src/errors.hpp"
#include "src/log.hpp"

namespace lazymig::net {
namespace {

class TcpChannel final : public Channel {
public:
    TcpChannel(Fd fd, std::string where, Ring send, Ring recv)
        : fd_(std::move(fd)), where_(std::move(where)), send_(std::move(send)), recv_(std::move(recv)) {}

    const std::string& where() const override { return where_; }

    Result<std::size_t> recv_some(void* dst, std::size_t len) override {
        auto r = classify(recv_.recv_some(fd_.get(), dst, len, where_));
        if (r) received_.fetch_add(*r, std::memory_order_relaxed);
        return r;
    }
    Result<void> recv_exact(void* dst, std::size_t len) override {
        auto r = classify(recv_.recv_exact(fd_.get(), dst, len, where_));
        if (r) received_.fetch_add(len, std::memory_order_relaxed);
        return r;
    }
    Result<void> send(std::span<const iovec> iov) override {
        auto r = classify(send_.send_all(fd_.get(), iov, where_));
        if (r) count_sent(iov);
        return r;
    }
    Result<void> send_start(std::span<const iovec> iov) override {
        pending_bytes_ = 0;
        for (const auto& v : iov) pending_bytes_ += v.iov_len;
        return classify(send_.send_start(fd_.get(), iov, where_));
    }
    Result<void> send_finish() override {
        auto r = classify(send_.send_finish());
        if (r) sent_.fetch_add(std::exchange(pending_bytes_, 0), std::memory_order_relaxed);
        return r;
    }
    Result<void> wait_until(std::chrono::steady_clock::time_point deadline) override {
        return send_.wait_until(deadline);
    }
    Result<std::size_t> try_send(std::span<const std::byte> bytes) override {
        for (;;) {
            const ssize_t n = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n >= 0) {
                sent_.fetch_add(static_cast<std::size_t>(n), std::memory_order_relaxed);
                return static_cast<std::size_t>(n);
            }
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            const int e = errno;
            return classify<std::size_t>(sys_error(fmt::format("{}: sending", where_), e));
        }
    }
    int poll_fd() const override { return fd_.get(); }
    std::uint64_t bytes_received() const override { return received_.load(std::memory_order_relaxed); }
    std::uint64_t bytes_sent() const override { return sent_.load(std::memory_order_relaxed); }

private:
    void count_sent(std::span<const iovec> iov) {
        std::size_t n = 0;
        for (const auto& v : iov) n += v.iov_len;
        sent_.fetch_add(n, std::memory_order_relaxed);
    }

    Fd fd_;
    std::string where_;
    Ring send_, recv_;
    std::size_t pending_bytes_ = 0;
    std::atomic<std::uint64_t> received_{0}, sent_{0};
};

class TcpConnector final : public Transport {
public:
    TcpConnector(Endpoint to, int shutdown_fd, std::chrono::milliseconds timeout, std::shared_ptr<TlsContext> tls)
        : to_(std::move(to)), shutdown_fd_(shutdown_fd), timeout_(timeout), tls_(std::move(tls)) {}
    std::string_view name() const override { return tls_ ? "tcp+tls" : "tcp"; }
    std::string_view security() const override { return tls_ ? tls_->mode() : "none"; }
    Result<std::unique_ptr<Channel>> connect(std::string what, bool low_latency) override {
        auto fd = classify(connect_tcp(to_, shutdown_fd_, timeout_, low_latency));
        if (!fd) return std::unexpected(fd.error().wrap(what));
        std::string where = fmt::format("{} to {}", what, to_.uri());
        if (!tls_) return stream_channel(std::move(*fd), std::move(where), shutdown_fd_);
        auto hs = Handshake::start(tls_, std::move(*fd), to_.uri(),
                                   std::chrono::steady_clock::now() + tls_->handshake_timeout());
        if (!hs) return std::unexpected(hs.error().wrap(where));
        if (auto r = hs->run(shutdown_fd_); !r) return std::unexpected(r.error().wrap(where));
        return std::move(*hs).into_channel(std::move(where), shutdown_fd_);
    }
    Result<std::unique_ptr<Channel>> accept(std::string, std::chrono::milliseconds, bool) override {
        return logic_error("tcp transport: accept() on the connecting side");
    }
    void close_listener() override {}
    std::string local_uri() const override { return to_.uri(); }

private:
    Endpoint to_;
    int shutdown_fd_;
    std::chrono::milliseconds timeout_;
    std::shared_ptr<TlsContext> tls_;
};

class TcpListener final : public Transport {
public:
    TcpListener(Fd listener, Endpoint local, int shutdown_fd)
        : listener_(std::move(listener)), local_(std::move(local)), shutdown_fd_(shutdown_fd) {}
    std::string_view name() const override { return "tcp"; }
    Result<std::unique_ptr<Channel>> connect(std::string, bool) override {
        return logic_error("tcp transport: connect() on the listening side");
    }
    Result<std::unique_ptr<Channel>> accept(std::string what, std::chrono::milliseconds timeout,
                                            bool low_latency) override {
        if (!listener_.valid()) return logic_error(fmt::format("{}: no longer accepting channels", local_.uri()));
        auto fd = accept_tcp(listener_.get(), shutdown_fd_, timeout);
        if (!fd) return std::unexpected(fd.error());
        if (low_latency)
            if (auto r = set_nodelay(fd->get()); !r) return std::unexpected(r.error());
        return stream_channel(std::move(*fd), fmt::format("{} from the source", what), shutdown_fd_);
    }
    void close_listener() override { listener_.reset(); }
    std::string local_uri() const override { return local_.uri(); }

private:
    Fd listener_;
    Endpoint local_;
    int shutdown_fd_;
};

// TLS listening: every connection is a handshake with a deadline, run side by side in one
// poll, so a stranger costs one bounded handshake and never blocks the real source.
class TlsListener final : public Transport {
public:
    // Handshakes in progress at once; more connections wait in the kernel's backlog.
    static constexpr std::size_t kMaxPending = 16;

    TlsListener(Fd listener, Endpoint local, int shutdown_fd, std::shared_ptr<TlsContext> tls)
        : listener_(std::move(listener)), local_(std::move(local)), shutdown_fd_(shutdown_fd), tls_(std::move(tls)) {}
    std::string_view name() const override { return "tcp+tls"; }
    std::string_view security() const override { return tls_->mode(); }
    std::uint64_t refused() const override { return refused_.load(std::memory_order_relaxed); }
    Result<std::unique_ptr<Channel>> connect(std::string, bool) override {
        return logic_error("tls transport: connect() on the listening side");
    }
    void close_listener() override {
        listener_.reset();
        for (const auto& h : pending_) refuse(h.peer(), "still not authenticated when the migration's channels were all open");
        pending_.clear();
    }
    std::string local_uri() const override { return local_.uri(); }

    Result<std::unique_ptr<Channel>> accept(std::string what, std::chrono::milliseconds timeout,
                                            bool low_latency) override {
        using Clock = std::chrono::steady_clock;
        if (!listener_.valid()) return logic_error(fmt::format("{}: no longer accepting channels", local_.uri()));
        const auto until = timeout.count() < 0 ? Clock::time_point::max() : Clock::now() + timeout;
        std::vector<pollfd> fds;
        for (;;) {
            // Expired handshakes first: whatever else happens, they end now.
            const auto now = Clock::now();
            std::erase_if(pending_, [&](const Handshake& h) {
                if (h.deadline() > now) return false;
                refuse(h.peer(), fmt::format("no TLS handshake within {} ms", tls_->handshake_timeout().count()));
                return true;
            });
            if (now >= until)
                return transport_error(fmt::format("{}: no authenticated source connected within {} ms", what,
                                                   timeout.count()), ETIMEDOUT);
            auto wake = until;
            for (const auto& h : pending_) wake = std::min(wake, h.deadline());
            fds.assign({{shutdown_fd_, POLLIN, 0}, {listener_.get(), POLLIN, 0}});
            if (pending_.size() >= kMaxPending) fds[1].fd = -1;  // poll ignores it
            for (const auto& h : pending_) fds.push_back({h.fd(), h.events(), 0});
            const int ms = wake == Clock::time_point::max()
                               ? -1
                               : static_cast<int>(std::max<long>(
                                     0, std::chrono::ceil<std::chrono::milliseconds>(wake - now).count()));
            const int n = ::poll(fds.data(), fds.size(), ms);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return LZ_SYS_ERROR("{}: poll on the listener", what);
            if (fds[0].revents) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
            // Handshakes that can move; the new connection (appended below) is not among them.
            for (std::size_t i = 0, k = 2; i < pending_.size() && k < fds.size(); ++k) {
                if (!fds[k].revents) {
                    ++i;
                    continue;
                }
                auto done = pending_[i].step();
                if (!done) {
                    refuse(pending_[i].peer(), done.error().message());
                    pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
                    continue;
                }
                if (!*done) {
                    ++i;
                    continue;
                }
                Handshake h = std::move(pending_[i]);
                pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
                if (low_latency)
                    if (auto r = set_nodelay(h.fd()); !r) return std::unexpected(r.error());
                LZ_LOG(info, "listener_authenticated", "listen={} peer={} channel=\"{}\"", local_.uri(), h.peer(), what);
                return std::move(h).into_channel(fmt::format("{} from the source", what), shutdown_fd_);
            }
            if (fds[1].fd >= 0 && fds[1].revents) {
                Fd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
                if (!fd.valid()) {
                    if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
                    return LZ_SYS_ERROR("{}: accept", what);
                }
                if (auto l = set_liveness(fd.get()); !l) return std::unexpected(l.error().wrap(what));
                std::string peer = peer_address(fd.get());
                auto h = Handshake::start(tls_, std::move(fd), peer, Clock::now() + tls_->handshake_timeout());
                if (!h) return std::unexpected(h.error().wrap(what));
                LZ_LOG(debug, "listener_handshake", "peer={} pending={}", peer, pending_.size() + 1);
                pending_.push_back(std::move(*h));
            }
        }
    }

private:
    void refuse(const std::string& peer, const std::string& reason) {
        refused_.fetch_add(1, std::memory_order_relaxed);
        LZ_LOG(warn, "listener_refused", "listen={} peer={} reason=\"{}\"", local_.uri(), peer, reason);
    }

    Fd listener_;
    Endpoint local_;
    int shutdown_fd_;
    std::shared_ptr<TlsContext> tls_;
    std::deque<Handshake> pending_;
    std::atomic<std::uint64_t> refused_{0};
};

}  // namespace

Result<std::unique_ptr<Channel>> stream_channel(Fd fd, std::string where, int shutdown_fd) {
    auto send = Ring::create(shutdown_fd);
    if (!send) return std::unexpected(send.error().wrap(where));
    auto recv = Ring::create(shutdown_fd);
    if (!recv) return std::unexpected(recv.error().wrap(where));
    return std::make_unique<TcpChannel>(std::move(fd), std::move(where), std::move(*send), std::move(*recv));
}

Result<std::unique_ptr<Transport>> tcp_connector(std::string_view uri, int shutdown_fd,
                                                 std::chrono::milliseconds connect_timeout,
                                                 std::shared_ptr<TlsContext> tls) {
    auto to = parse_uri(uri);
    if (!to) return std::unexpected(to.error());
    if (to->port == 0) return logic_error(fmt::format("uri '{}' needs the destination's port", uri));
    return std::make_unique<TcpConnector>(std::move(*to), shutdown_fd, connect_timeout, std::move(tls));
}

Result<std::unique_ptr<Transport>> tcp_listener(std::string_view uri, int shutdown_fd,
                                                std::shared_ptr<TlsContext> tls) {
    auto at = parse_uri(uri);
    if (!at) return std::unexpected(at.error());
    auto listener = listen_tcp(*at);
    if (!listener) return std::unexpected(listener.error());
    auto local = local_endpoint(listener->get());
    if (!local) return std::unexpected(local.error());
    if (tls) return std::make_unique<TlsListener>(std::move(*listener), std::move(*local), shutdown_fd, std::move(tls));
    return std::make_unique<TcpListener>(std::move(*listener), std::move(*local), shutdown_fd);
}

}  // namespace lazymig::net
