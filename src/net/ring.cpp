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
    // SINGLE_ISSUER + DEFER_TASKRUN: completions run in our own wait, no IPIs, no
    // task-work interrupting the thread elsewhere. Both are in 6.1+; we need 6.1 anyway.
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int ret = io_uring_queue_init_params(entries, &r.ring_, &p);
    if (ret == -EINVAL) {
        p = {};
        ret = io_uring_queue_init_params(entries, &r.ring_, &p);
    }
    if (ret < 0) return sys_error("io_uring_queue_init", -ret);
    r.live_ = true;
    r.shutdown_fd_ = shutdown_fd;
    return r;
}

Ring::Ring(Ring&& o) noexcept
    : ring_(o.ring_), live_(std::exchange(o.live_, false)), shutdown_fd_(o.shutdown_fd_),
      poll_armed_(o.poll_armed_), shut_down_(o.shut_down_) {}

Ring& Ring::operator=(Ring&& o) noexcept {
    if (this != &o) {
        close();
        ring_ = o.ring_;
        live_ = std::exchange(o.live_, false);
        shutdown_fd_ = o.shutdown_fd_;
        poll_armed_ = o.poll_armed_;
        shut_down_ = o.shut_down_;
    }
    return *this;
}

Ring::~Ring() { close(); }

void Ring::close() noexcept {
    if (live_) io_uring_queue_exit(&ring_);
    live_ = false;
}

Result<int> Ring::run(std::string_view what) {
    if (shut_down_) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
    if (!poll_armed_ && shutdown_fd_ >= 0) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        io_uring_prep_poll_add(sqe, shutdown_fd_, POLLIN);
        io_uring_sqe_set_data64(sqe, kShutdown);
        poll_armed_ = true;
    }
    int ret = io_uring_submit(&ring_);
    if (ret < 0) return sys_error(fmt::format("{}: io_uring_submit", what), -ret);
    bool cancelling = false;
    for (;;) {
        io_uring_cqe* cqe = nullptr;
        ret = io_uring_wait_cqe(&ring_, &cqe);
        if (ret == -EINTR) continue;
        if (ret < 0) return sys_error(fmt::format("{}: io_uring_wait_cqe", what), -ret);
        const std::uint64_t tag = io_uring_cqe_get_data64(cqe);
        const int res = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        if (tag == kOp) {
            if (cancelling || shut_down_) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
            return res;
        }
        if (tag == kShutdown && !cancelling) {
            shut_down_ = true;
            cancelling = true;
            io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
            io_uring_prep_cancel64(sqe, kOp, 0);
            io_uring_sqe_set_data64(sqe, kCancel);
            if (int s = io_uring_submit(&ring_); s < 0)
                return sys_error(fmt::format("{}: io_uring_submit cancel", what), -s);
        }
        // kCancel completions only confirm the cancel; the op's own CQE follows.
    }
}

Result<void> Ring::send_all(int fd, std::span<const iovec> iov_in, std::string_view what) {
    // Short sends advance through a private copy of the vector.
    iovec local[64];
    std::vector<iovec> heap;
    iovec* iov = local;
    if (iov_in.size() > std::size(local)) {
        heap.assign(iov_in.begin(), iov_in.end());
        iov = heap.data();
    } else {
        std::copy(iov_in.begin(), iov_in.end(), local);
    }
    std::size_t n = iov_in.size();
    while (n > 0) {
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = n;
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        io_uring_prep_sendmsg(sqe, fd, &msg, MSG_NOSIGNAL | MSG_WAITALL);
        io_uring_sqe_set_data64(sqe, kOp);
        auto r = run(what);
        if (!r) return std::unexpected(r.error());
        if (*r < 0) return sys_error(std::string(what), -*r);
        auto sent = static_cast<std::size_t>(*r);
        while (n > 0 && sent >= iov->iov_len) {
            sent -= iov->iov_len;
            ++iov;
            --n;
        }
        if (n > 0) {
            iov->iov_base = static_cast<char*>(iov->iov_base) + sent;
            iov->iov_len -= sent;
        }
    }
    return {};
}

Result<void> Ring::send_all(int fd, const void* buf, std::size_t len, std::string_view what) {
    iovec one{const_cast<void*>(buf), len};
    return send_all(fd, std::span(&one, 1), what);
}

Result<std::size_t> Ring::recv_some(int fd, void* buf, std::size_t len, std::string_view what) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    io_uring_prep_recv(sqe, fd, buf, len, 0);
    io_uring_sqe_set_data64(sqe, kOp);
    auto r = run(what);
    if (!r) return std::unexpected(r.error());
    if (*r < 0) return sys_error(std::string(what), -*r);
    return static_cast<std::size_t>(*r);
}

Result<void> Ring::recv_exact(int fd, void* buf, std::size_t len, std::string_view what) {
    std::size_t got = 0;
    while (got < len) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        io_uring_prep_recv(sqe, fd, static_cast<char*>(buf) + got, len - got, MSG_WAITALL);
        io_uring_sqe_set_data64(sqe, kOp);
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
    const auto now = std::chrono::steady_clock::now();
    if (deadline <= now) return {};
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
    __kernel_timespec ts{.tv_sec = ns / 1'000'000'000, .tv_nsec = ns % 1'000'000'000};
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    io_uring_prep_timeout(sqe, &ts, 0, 0);
    io_uring_sqe_set_data64(sqe, kOp);
    auto r = run("pacing wait");
    if (!r) return std::unexpected(r.error());
    if (*r < 0 && *r != -ETIME) return sys_error("pacing wait", -*r);
    return {};
}

}  // namespace lazymig::net
