// watchdog.hpp — every wait of a session has an end: phase deadlines and heartbeats.
//
// One thread per session endpoint, blocked in poll on the shutdown eventfd and its own
// wake eventfd, with the nearest deadline as timeout. Two jobs:
//   - a phase deadline (arm/disarm): the session thread arms it before a wait on the
//     peer (region table, device state, DEVICE_LOADED, GO); if it passes first, the
//     watchdog fails the session with the armed sentence, which stops every channel
//     wait through the shutdown eventfd;
//   - liveness (watch): during post-copy it calls `beat` every timeout/4 (the
//     destination sends a HEARTBEAT; the source echoes each one it receives) and fails
//     the session, class transport_lost, when the watched channel received nothing for
//     `timeout` (in post-copy over TCP that pauses the session instead: recover).
// The watchdog never touches a channel's receiving side; `beat` must not block.
// Owner: the session; stop() (or the destructor) joins the thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "lazymig/error.hpp"
#include "src/net/channel.hpp"
#include "src/net/socket.hpp"

namespace lazymig {

class Watchdog {
public:
    using Clock = std::chrono::steady_clock;
    // `fail` is called (on the watchdog thread) with the error that ends the session.
    [[nodiscard]] static Result<std::unique_ptr<Watchdog>> start(int shutdown_fd, std::function<void(const Error&)> fail);
    ~Watchdog();
    Watchdog(const Watchdog&) = delete;
    Watchdog& operator=(const Watchdog&) = delete;

    // Fails the session with `why` (class transport_lost, ETIMEDOUT) unless disarm()ed
    // within `timeout`. Replaces an armed deadline.
    void arm(std::chrono::milliseconds timeout, std::string why);
    void disarm();
    // Starts liveness on `channel` (see above). `beat` may be empty.
    void watch(const net::Channel& channel, std::chrono::milliseconds timeout, std::function<void()> beat,
               std::string who);
    void unwatch();
    void stop();

private:
    Watchdog() = default;
    void run();
    void wake();

    int shutdown_fd_ = -1;
    net::Fd wake_fd_;
    std::function<void(const Error&)> fail_;
    std::mutex mu_;
    std::optional<Clock::time_point> deadline_;
    std::string why_;
    std::chrono::milliseconds armed_for_{0};
    const net::Channel* watched_ = nullptr;
    std::chrono::milliseconds live_timeout_{0};
    std::function<void()> beat_;
    std::string who_;
    std::uint64_t last_bytes_ = 0;
    Clock::time_point last_heard_{}, next_beat_{};
    bool stopping_ = false;
    std::thread thread_;
};

}  // namespace lazymig
