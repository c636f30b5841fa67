// net/ring.hpp — blocking socket I/O on io_uring, interruptible by a shutdown eventfd.
//
// One Ring per thread (rings are created SINGLE_ISSUER by the thread that uses them).
// Every call submits one operation plus, once per ring, a poll on the shutdown eventfd,
// then blocks in io_uring_wait_cqe: the thread's one blocking place. When the eventfd
// fires, the pending operation is cancelled and the call fails with ECANCELED; so does
// every later call.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <span>
#include <string>

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
    [[nodiscard]] Result<void> send_all(int fd, const void* buf, std::size_t len, std::string_view what);
    // Receives up to `len` bytes; returns 0 at end of stream.
    [[nodiscard]] Result<std::size_t> recv_some(int fd, void* buf, std::size_t len, std::string_view what);
    // Receives exactly `len` bytes. End of stream first is ECONNRESET with the count so far.
    [[nodiscard]] Result<void> recv_exact(int fd, void* buf, std::size_t len, std::string_view what);
    // Waits until `deadline` (pacing), or ECANCELED on shutdown.
    [[nodiscard]] Result<void> wait_until(std::chrono::steady_clock::time_point deadline);

    [[nodiscard]] bool shut_down() const { return shut_down_; }

private:
    // Submits the prepared op (user_data kOp) and waits for its completion.
    Result<int> run(std::string_view what);
    void close() noexcept;

    io_uring ring_{};
    bool live_ = false;
    int shutdown_fd_ = -1;
    bool poll_armed_ = false;
    bool shut_down_ = false;
};

}  // namespace lazymig::net
