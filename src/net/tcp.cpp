// TCP channels over io_uring: the first implementation of the transport seam.
//
// Each channel owns its socket and two rings, one per direction, so the receiving
// thread and the sending thread block independently. A ring's single pending operation
// and the shared shutdown poll are all it ever has in flight.
#include <sys/socket.h>

#include <atomic>

#include <fmt/format.h>

#include "src/net/channel.hpp"
#include "src/net/ring.hpp"
#include "src/net/socket.hpp"

namespace lazymig::net {
namespace {

// The link broke: the session may pause and recover instead of failing (DESIGN.md).
bool link_errno(int e) {
    switch (e) {
    case ECONNRESET: case EPIPE: case ETIMEDOUT: case ENOTCONN: case ECONNABORTED:
    case EHOSTUNREACH: case ENETUNREACH: case ENETDOWN: case ECONNREFUSED: case EHOSTDOWN:
        return true;
    default:
        return false;
    }
}

template <class T>
Result<T> classify(Result<T> r) {
    if (!r && link_errno(r.error().code)) r.error().kind = ErrorClass::transport_lost;
    return r;
}

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
    TcpConnector(Endpoint to, int shutdown_fd, std::chrono::milliseconds timeout)
        : to_(std::move(to)), shutdown_fd_(shutdown_fd), timeout_(timeout) {}
    std::string_view name() const override { return "tcp"; }
    Result<std::unique_ptr<Channel>> connect(std::string what, bool low_latency) override {
        auto fd = classify(connect_tcp(to_, shutdown_fd_, timeout_, low_latency));
        if (!fd) return std::unexpected(fd.error().wrap(what));
        return stream_channel(std::move(*fd), fmt::format("{} to {}", what, to_.uri()), shutdown_fd_);
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

}  // namespace

Result<std::unique_ptr<Channel>> stream_channel(Fd fd, std::string where, int shutdown_fd) {
    auto send = Ring::create(shutdown_fd);
    if (!send) return std::unexpected(send.error().wrap(where));
    auto recv = Ring::create(shutdown_fd);
    if (!recv) return std::unexpected(recv.error().wrap(where));
    return std::make_unique<TcpChannel>(std::move(fd), std::move(where), std::move(*send), std::move(*recv));
}

Result<std::unique_ptr<Transport>> tcp_connector(std::string_view uri, int shutdown_fd,
                                                 std::chrono::milliseconds connect_timeout) {
    auto to = parse_uri(uri);
    if (!to) return std::unexpected(to.error());
    if (to->port == 0) return logic_error(fmt::format("uri '{}' needs the destination's port", uri));
    return std::make_unique<TcpConnector>(std::move(*to), shutdown_fd, connect_timeout);
}

Result<std::unique_ptr<Transport>> tcp_listener(std::string_view uri, int shutdown_fd) {
    auto at = parse_uri(uri);
    if (!at) return std::unexpected(at.error());
    auto listener = listen_tcp(*at);
    if (!listener) return std::unexpected(listener.error());
    auto local = local_endpoint(listener->get());
    if (!local) return std::unexpected(local.error());
    return std::make_unique<TcpListener>(std::move(*listener), std::move(*local), shutdown_fd);
}

}  // namespace lazymig::net
