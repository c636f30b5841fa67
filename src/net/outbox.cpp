#include "src/net/outbox.hpp"
#include "src/errors.hpp"

#include <poll.h>

#include <cstring>

#include <fmt/format.h>

namespace lazymig::net {

Outbox::Outbox(Channel& channel, int shutdown_fd, std::size_t capacity)
    : channel_(channel), shutdown_fd_(shutdown_fd), capacity_(capacity) {
    queue_.reserve(capacity_);
}

bool Outbox::pending() const {
    std::lock_guard lock(mu_);
    return head_ < queue_.size() || channel_.send_backlog();
}

Result<void> Outbox::drain_locked() {
    if (channel_.send_backlog())  // the channel's own leftovers go first (TLS ciphertext)
        if (auto n = channel_.try_send({}); !n) return std::unexpected(n.error());
    while (head_ < queue_.size()) {
        auto n = channel_.try_send(std::span(queue_).subspan(head_));
        if (!n) return std::unexpected(n.error());
        if (*n == 0) break;
        head_ += *n;
    }
    if (head_ == queue_.size()) {
        queue_.clear();
        head_ = 0;
    } else if (head_ > capacity_ / 2) {  // keep the unsent tail at the front
        queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(head_));
        head_ = 0;
    }
    return {};
}

Result<void> Outbox::post(std::span<const std::byte> frame) {
    std::lock_guard lock(mu_);
    if (queue_.size() - head_ + frame.size() > capacity_)
        return sys_error(fmt::format("{}: {} bytes wait to be sent, no room for {} more", channel_.where(),
                                     queue_.size() - head_, frame.size()),
                         EAGAIN);
    if (head_ == queue_.size()) {
        // The common case: nothing queued, the socket takes the frame now.
        queue_.clear();
        head_ = 0;
        std::size_t off = 0;
        while (off < frame.size()) {
            auto n = channel_.try_send(frame.subspan(off));
            if (!n) return std::unexpected(n.error());
            if (*n == 0) break;
            off += *n;
        }
        queue_.insert(queue_.end(), frame.begin() + static_cast<std::ptrdiff_t>(off), frame.end());
        return {};
    }
    queue_.insert(queue_.end(), frame.begin(), frame.end());
    return drain_locked();
}

Result<bool> Outbox::flush() {
    std::lock_guard lock(mu_);
    if (auto r = drain_locked(); !r) return std::unexpected(r.error());
    return head_ == queue_.size() && !channel_.send_backlog();
}

namespace {

// Blocks until `fd` may take bytes, the shutdown eventfd fires or the deadline passes.
Result<void> wait_writable(int fd, int shutdown_fd, std::chrono::steady_clock::time_point deadline,
                           std::chrono::milliseconds timeout, const std::string& where) {
    for (;;) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0)
            return transport_error(fmt::format("{}: the peer took no bytes for {} ms", where, timeout.count()), ETIMEDOUT);
        pollfd fds[2] = {{fd, POLLOUT, 0}, {shutdown_fd, POLLIN, 0}};
        const int n = ::poll(fds, 2, static_cast<int>(left.count()));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return LZ_SYS_ERROR("{}: poll for POLLOUT", where);
        if (n > 0 && fds[1].revents) return sys_error(fmt::format("{}: shut down", where), ECANCELED);
        if (n > 0) return {};
    }
}

}  // namespace

Result<void> Outbox::post_and_flush(std::span<const std::byte> frame, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {  // room for the frame
        auto r = post(frame);
        if (r) break;
        if (r.error().code != EAGAIN) return r;
        auto w = flush();
        if (!w) return std::unexpected(w.error());
        if (!*w)
            if (auto ok = wait_writable(channel_.poll_fd(), shutdown_fd_, deadline, timeout, channel_.where()); !ok)
                return ok;
    }
    for (;;) {  // every byte gone
        auto done = flush();
        if (!done) return std::unexpected(done.error());
        if (*done) return {};
        if (auto ok = wait_writable(channel_.poll_fd(), shutdown_fd_, deadline, timeout, channel_.where()); !ok)
            return ok;
    }
}

}  // namespace lazymig::net
