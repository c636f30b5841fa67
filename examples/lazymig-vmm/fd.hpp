// fd.hpp — a move-only owner of one file descriptor, and an eventfd used as a wake-up.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <utility>

#include <fmt/format.h>

#include "lazymig/error.hpp"

namespace vmm {

class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) noexcept : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept {
        if (this != &o) reset(std::exchange(o.fd_, -1));
        return *this;
    }
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    ~UniqueFd() { reset(); }

    [[nodiscard]] int get() const noexcept { return fd_; }
    [[nodiscard]] explicit operator bool() const noexcept { return fd_ >= 0; }
    // Gives up ownership: the caller closes the returned fd.
    [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

// An eventfd that one thread signals and another polls: the shutdown and wake-up
// channel of every thread here that blocks in poll().
class EventFd {
public:
    [[nodiscard]] static lazymig::Result<EventFd> create() noexcept {
        const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (fd < 0) return lazymig::sys_error("eventfd");
        EventFd e;
        e.fd_.reset(fd);
        return e;
    }
    [[nodiscard]] int fd() const noexcept { return fd_.get(); }
    // Never blocks: the counter saturating would take 2^64-1 signals.
    void signal() const noexcept {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(fd_.get(), &one, sizeof one);
    }
    void drain() const noexcept {
        std::uint64_t v;
        [[maybe_unused]] auto n = ::read(fd_.get(), &v, sizeof v);
    }

private:
    UniqueFd fd_;
};

}  // namespace vmm
