// net/ring.hpp — blocking socket I/O on io_uring, interruptible by a shutdown eventfd.
//
// A Ring is used by one thread at a time (a channel has one for each direction; a
// direction may pass from the session thread to the pusher between calls, so rings are
// not created SINGLE_ISSUER: measured here, SINGLE_ISSUER|DEFER_TASKRUN changed the
// demand-fault p50 by less than run-to-run noise, 93–102 vs 94–96 µs).
// Every call submits one operation plus, once per ring, a poll on the shutdown eventfd,
// then blocks in io_uring_wait_cqe: the thread's one blocking place. When the eventfd
// fires, the pending operation is cancelled and the call fails with ECANCELED; so does
// every later call. send_start()/send_finish() split a send in two so that the caller
// can prepare the next batch while this one is on the wire.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "lazymig/error.hpp"

namespace lazymig::net {

class Ring {
public:
    [[nodiscard]] static Result<Ring> create(int shutdown_fd, unsigned entries = 8);
    Ring() = default;
    Ring(Ring&&) noexcept;
    Ring& operator=(Ring&&) noexcept;
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;
    ~Ring();

    // Sends every byte of `iov` (gathered), looping over short sends.
    [[nodiscard]] Result<void> send_all(int fd, std::span<const iovec> iov, std::string_view what);
    // Starts sending every byte of `iov`; the bytes must stay valid until send_finish().
    // REQUIRES: no send started and not finished on this ring.
    [[nodiscard]] Result<void> send_start(int fd, std::span<const iovec> iov, std::string_view what);
    // Completes the started send (resubmitting after short sends); no-op if none.
    [[nodiscard]] Result<void> send_finish();
    [[nodiscard]] Result<void> send_all(int fd, const void* buf, std::size_t len, std::string_view what);
    // Receives up to `len` bytes; returns 0 at end of stream.
    [[nodiscard]] Result<std::size_t> recv_some(int fd, void* buf, std::size_t len, std::string_view what);
    // Receives exactly `len` bytes. End of stream first is ECONNRESET with the count so far.
    [[nodiscard]] Result<void> recv_exact(int fd, void* buf, std::size_t len, std::string_view what);
    // Waits until `deadline` (pacing), or ECANCELED on shutdown.
    [[nodiscard]] Result<void> wait_until(std::chrono::steady_clock::time_point deadline);

    [[nodiscard]] bool shut_down() const { return shut_down_; }

private:
    // A free submission slot; the queue is flushed once if it is full (NULL from
    // io_uring_get_sqe), and an error names `what` if it stays full.
    Result<io_uring_sqe*> sqe(std::string_view what);
    // Submits the prepared op (user_data kOp) and the shutdown poll if not armed yet.
    Result<void> submit(std::string_view what);
    // Waits for the op's completion; ECANCELED once the shutdown eventfd fired.
    Result<int> reap(std::string_view what);
    Result<int> run(std::string_view what);
    Result<void> prep_send(std::string_view what);
    void close() noexcept;

    io_uring ring_{};
    bool live_ = false;
    int shutdown_fd_ = -1;
    bool poll_armed_ = false;
    bool shut_down_ = false;
    bool op_pending_ = false;
    // The send in flight (send_start .. send_finish): its remaining vector and header.
    int send_fd_ = -1;
    std::string send_what_;
    std::vector<iovec> send_iov_;
    std::size_t send_next_ = 0;
    msghdr send_msg_{};
};

}  // namespace lazymig::net
