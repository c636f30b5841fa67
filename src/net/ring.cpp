#include "src/net/ring.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <vector>

#include <fmt/format.h>

namespace lazymig::net {
namespace {
constexpr std::uint64_t kOp = 1, kShutdown = 2, kCancel = 3;
}

Result<Ring> Ring::create(int shutdown_fd, unsigned entries) {
    Ring r;
    io_uring_params p{};
    if (int ret = io_uring_queue_init_params(entries, &r.ring_, &p); ret < 0) return sys_error("io_uring_queue_init", -ret);
    r.live_ = true;
    r.shutdown_fd_ = shutdown_fd;
    return r;
}

Ring::Ring(Ring&& o) noexcept
    : ring_(o.ring_), live_(std::exchange(o.live_, false)), shutdown_fd_(o.shutdown_fd_),
      poll_armed_(o.poll_armed_), shut_down_(o.shut_down_), op_pending_(o.op_pending_) {}

Ring& Ring::operator=(Ring&& o) noexcept {
    if (this != &o) {
        close();
        ring_ = o.ring_;
        live_ = std::exchange(o.live_, false);
        shutdown_fd_ = o.shutdown_fd_;
        poll_armed_ = o.poll_armed_;
        shut_down_ = o.shut_down_;
        op_pending_ = o.op_pending_;
    }
    return *this;
}

Ring::~Ring() { close(); }

void Ring::close() noexcept {
    if (live_) io_uring_queue_exit(&ring_);
    live_ = false;
}

Result<io_uring_sqe*> Ring::sqe(std::string_view what) {
    if (!live_) return logic_error(fmt::format("{}: no io_uring (moved from or closed)", what));
    io_uring_sqe* s = io_uring_get_sqe(&ring_);
    if (s) return s;
    // Full submission queue: hand what is queued to the kernel and take a slot again.
    if (int ret = io_uring_submit(&ring_); ret < 0) return sys_error(fmt::format("{}: io_uring_submit", what), -ret);
    s = io_uring_get_sqe(&ring_);
    if (!s) return sys_error(fmt::format("{}: io_uring submission queue stays full", what), EBUSY);
    return s;
}

Result<void> Ring::submit(std::string_view what) {
    if (shut_down_) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
    if (!poll_armed_ && shutdown_fd_ >= 0) {
        auto s = sqe(what);
        if (!s) return std::unexpected(s.error());
        io_uring_prep_poll_add(*s, shutdown_fd_, POLLIN);
        io_uring_sqe_set_data64(*s, kShutdown);
        poll_armed_ = true;
    }
    if (int ret = io_uring_submit(&ring_); ret < 0) return sys_error(fmt::format("{}: io_uring_submit", what), -ret);
    op_pending_ = true;
    return {};
}

Result<int> Ring::reap(std::string_view what) {
    bool cancelling = false;
    for (;;) {
        io_uring_cqe* cqe = nullptr;
        int ret = io_uring_wait_cqe(&ring_, &cqe);
        if (ret == -EINTR) continue;
        if (ret < 0) return sys_error(fmt::format("{}: io_uring_wait_cqe", what), -ret);
        const std::uint64_t tag = io_uring_cqe_get_data64(cqe);
        const int res = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        if (tag == kOp) {
            op_pending_ = false;
            if (cancelling || shut_down_) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
            return res;
        }
        if (tag == kShutdown && !cancelling) {
            shut_down_ = true;
            cancelling = true;
            auto s = sqe(what);
            if (!s) return std::unexpected(s.error());
            io_uring_prep_cancel64(*s, kOp, 0);
            io_uring_sqe_set_data64(*s, kCancel);
            if (int e = io_uring_submit(&ring_); e < 0)
                return sys_error(fmt::format("{}: io_uring_submit cancel", what), -e);
        }
        // kCancel completions only confirm the cancel; the op's own CQE follows.
    }
}

Result<int> Ring::run(std::string_view what) {
    if (auto s = submit(what); !s) return std::unexpected(s.error());
    return reap(what);
}

Result<void> Ring::send_all(int fd, std::span<const iovec> iov, std::string_view what) {
    if (auto s = send_start(fd, iov, what); !s) return s;
    return send_finish();
}

Result<void> Ring::prep_send(std::string_view what) {
    send_msg_ = msghdr{};
    send_msg_.msg_iov = send_iov_.data() + send_next_;
    send_msg_.msg_iovlen = send_iov_.size() - send_next_;
    auto s = sqe(what);
    if (!s) return std::unexpected(s.error());
    io_uring_prep_sendmsg(*s, send_fd_, &send_msg_, MSG_NOSIGNAL | MSG_WAITALL);
    io_uring_sqe_set_data64(*s, kOp);
    return submit(what);
}

Result<void> Ring::send_start(int fd, std::span<const iovec> iov, std::string_view what) {
    if (op_pending_ || send_fd_ >= 0) return logic_error(fmt::format("{}: a send is already in flight", what));
    send_iov_.assign(iov.begin(), iov.end());
    std::erase_if(send_iov_, [](const iovec& v) { return v.iov_len == 0; });
    send_next_ = 0;
    send_what_ = what;
    if (send_iov_.empty()) return {};
    send_fd_ = fd;
    if (auto r = prep_send(what); !r) {
        send_fd_ = -1;
        return r;
    }
    return {};
}

Result<void> Ring::send_finish() {
    while (send_fd_ >= 0) {
        auto r = reap(send_what_);
        if (!r || *r < 0) {
            send_fd_ = -1;
            if (!r) return std::unexpected(r.error());
            return sys_error(send_what_, -*r);
        }
        // Short send (a signal, or the peer's window): advance and go on.
        auto sent = static_cast<std::size_t>(*r);
        while (send_next_ < send_iov_.size() && sent >= send_iov_[send_next_].iov_len) sent -= send_iov_[send_next_++].iov_len;
        if (send_next_ == send_iov_.size()) {
            send_fd_ = -1;
            break;
        }
        auto& v = send_iov_[send_next_];
        v.iov_base = static_cast<char*>(v.iov_base) + sent;
        v.iov_len -= sent;
        if (auto p = prep_send(send_what_); !p) {
            send_fd_ = -1;
            return p;
        }
    }
    return {};
}

Result<void> Ring::send_all(int fd, const void* buf, std::size_t len, std::string_view what) {
    iovec one{const_cast<void*>(buf), len};
    return send_all(fd, std::span(&one, 1), what);
}

Result<std::size_t> Ring::recv_some(int fd, void* buf, std::size_t len, std::string_view what) {
    auto sqe = this->sqe(what);
    if (!sqe) return std::unexpected(sqe.error());
    io_uring_prep_recv(*sqe, fd, buf, len, 0);
    io_uring_sqe_set_data64(*sqe, kOp);
    auto r = run(what);
    if (!r) return std::unexpected(r.error());
    if (*r < 0) return sys_error(std::string(what), -*r);
    return static_cast<std::size_t>(*r);
}

Result<void> Ring::recv_exact(int fd, void* buf, std::size_t len, std::string_view what) {
    std::size_t got = 0;
    while (got < len) {
        auto sqe = this->sqe(what);
        if (!sqe) return std::unexpected(sqe.error());
        io_uring_prep_recv(*sqe, fd, static_cast<char*>(buf) + got, len - got, MSG_WAITALL);
        io_uring_sqe_set_data64(*sqe, kOp);
        auto r = run(what);
        if (!r) return std::unexpected(r.error());
        if (*r < 0) return sys_error(std::string(what), -*r);
        if (*r == 0)
            return sys_error(fmt::format("{}: peer closed the connection after {} of {} bytes", what, got, len),
                             ECONNRESET);
        got += static_cast<std::size_t>(*r);
    }
    return {};
}

Result<void> Ring::wait_until(std::chrono::steady_clock::time_point deadline) {
    // One operation at a time: the timer's completion would be taken for the send's.
    if (op_pending_ || send_fd_ >= 0) return logic_error("pacing wait: a send is still in flight on this ring");
    const auto now = std::chrono::steady_clock::now();
    if (deadline <= now) return {};
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
    __kernel_timespec ts{.tv_sec = ns / 1'000'000'000, .tv_nsec = ns % 1'000'000'000};
    auto sqe = this->sqe("pacing wait");
    if (!sqe) return std::unexpected(sqe.error());
    io_uring_prep_timeout(*sqe, &ts, 0, 0);
    io_uring_sqe_set_data64(*sqe, kOp);
    auto r = run("pacing wait");
    if (!r) return std::unexpected(r.error());
    if (*r < 0 && *r != -ETIME) return sys_error("pacing wait", -*r);
    return {};
}

}  // namespace lazymig::net
