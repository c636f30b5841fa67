// net/outbox.hpp — small frames from many threads onto one channel, without blocking.
//
// The destination sends its urgent-channel frames (PAGE_REQUEST from the fault thread;
// acks, RESUMED and COMPLETE from others) through one Outbox. post() appends a whole
// frame to a bounded queue and sends what the channel takes at once (almost always
// everything: frames are tens of bytes and the socket buffer is empty); what is left
// waits for the channel to drain. Frames never interleave.
//
// Who drains: a thread that must not block (the fault thread) polls poll_fd() for
// POLLOUT while pending() and calls flush(); a thread that may block calls
// post_and_flush(), which waits (poll, with a deadline and the shutdown eventfd) until
// the queue is empty. The bound is the back-pressure: post() fails with EAGAIN when the
// frame does not fit, and the fault thread then stops reading faults until it drains.
#pragma once

#include <chrono>
#include <mutex>
#include <span>
#include <vector>

#include "src/net/channel.hpp"

namespace lazymig::net {

class Outbox {
public:
    // `capacity` bytes of queued frames; 64 KiB holds ~2000 page requests.
    Outbox(Channel& channel, int shutdown_fd, std::size_t capacity = 64 * 1024);

    // Queues `frame` whole and sends what the channel takes now. Never blocks.
    // EAGAIN (class local) when the frame does not fit: nothing was queued.
    [[nodiscard]] Result<void> post(std::span<const std::byte> frame);
    // post(), then waits until every queued byte has left, at most `timeout`
    // (ETIMEDOUT, class transport_lost) or until shutdown (ECANCELED).
    [[nodiscard]] Result<void> post_and_flush(std::span<const std::byte> frame, std::chrono::milliseconds timeout);
    // Sends what the channel takes of the queue now; true when it is empty.
    [[nodiscard]] Result<bool> flush();
    [[nodiscard]] bool pending() const;
    [[nodiscard]] int poll_fd() const { return channel_.poll_fd(); }
    [[nodiscard]] const std::string& where() const { return channel_.where(); }

private:
    Result<void> drain_locked();  // REQUIRES: mu_ held

    Channel& channel_;
    int shutdown_fd_;
    std::size_t capacity_;
    mutable std::mutex mu_;
    std::vector<std::byte> queue_;  // unsent bytes are queue_[head_, end)
    std::size_t head_ = 0;
};

}  // namespace lazymig::net
