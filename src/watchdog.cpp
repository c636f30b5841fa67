#include "src/watchdog.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <fmt/format.h>

#include "src/log.hpp"

namespace lazymig {

Result<std::unique_ptr<Watchdog>> Watchdog::start(int shutdown_fd, std::function<void(const Error&)> fail) {
    std::unique_ptr<Watchdog> w(new Watchdog);
    w->shutdown_fd_ = shutdown_fd;
    w->fail_ = std::move(fail);
    w->wake_fd_ = net::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!w->wake_fd_.valid()) return sys_error("watchdog: eventfd");
    try {
        w->thread_ = std::thread([p = w.get()] { p->run(); });
    } catch (const std::system_error& e) {
        return sys_error("watchdog: starting its thread", e.code().value());
    }
    return w;
}

Watchdog::~Watchdog() { stop(); }

void Watchdog::stop() {
    {
        std::lock_guard lock(mu_);
        stopping_ = true;
    }
    wake();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void Watchdog::wake() {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_.get(), &one, sizeof one);
}

void Watchdog::arm(std::chrono::milliseconds timeout, std::string why) {
    {
        std::lock_guard lock(mu_);
        deadline_ = Clock::now() + timeout;
        armed_for_ = timeout;
        why_ = std::move(why);
    }
    wake();
}

void Watchdog::disarm() {
    std::lock_guard lock(mu_);
    deadline_.reset();
}

void Watchdog::watch(const net::Channel& channel, std::chrono::milliseconds timeout, std::function<void()> beat,
                     std::string who) {
    {
        std::lock_guard lock(mu_);
        watched_ = &channel;
        live_timeout_ = timeout;
        beat_ = std::move(beat);
        who_ = std::move(who);
        last_bytes_ = channel.bytes_received();
        last_heard_ = next_beat_ = Clock::now();
    }
    LZ_LOG(info, "watchdog_heartbeat", "watching {} timeout_ms={}", channel.where(), timeout.count());
    wake();
}

void Watchdog::unwatch() {
    std::lock_guard lock(mu_);
    watched_ = nullptr;
}

void Watchdog::run() {
    for (;;) {
        std::optional<Error> fire;
        std::function<void()> beat;
        Clock::time_point wake_at = Clock::time_point::max();
        {
            std::lock_guard lock(mu_);
            if (stopping_) return;
            const auto now = Clock::now();
            if (deadline_ && now >= *deadline_) {
                fire = Error{ETIMEDOUT, why_ + fmt::format(" (deadline {} ms)", armed_for_.count()),
                             ErrorClass::transport_lost};
                deadline_.reset();
            }
            if (watched_ && !fire) {
                const std::uint64_t bytes = watched_->bytes_received();
                if (bytes != last_bytes_) {
                    last_bytes_ = bytes;
                    last_heard_ = now;
                }
                const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - last_heard_);
                if (silent >= live_timeout_) {
                    fire = Error{ETIMEDOUT,
                                 fmt::format("{}: nothing received for {} ms (heartbeat timeout {} ms): the link is "
                                             "lost", who_, silent.count(), live_timeout_.count()),
                                 ErrorClass::transport_lost};
                    watched_ = nullptr;
                } else {
                    if (now >= next_beat_) {
                        beat = beat_;
                        next_beat_ = now + live_timeout_ / 4;
                    }
                    wake_at = std::min({wake_at, next_beat_, last_heard_ + live_timeout_});
                }
            }
            if (deadline_) wake_at = std::min(wake_at, *deadline_);
        }
        if (fire) {
            LZ_LOG(warn, "watchdog_fired", "{}", fire->message());
            fail_(*fire);
            continue;
        }
        if (beat) beat();
        int ms = -1;
        if (wake_at != Clock::time_point::max())
            ms = static_cast<int>(std::max<long>(
                0, std::chrono::ceil<std::chrono::milliseconds>(wake_at - Clock::now()).count()));
        pollfd fds[2] = {{wake_fd_.get(), POLLIN, 0}, {shutdown_fd_, POLLIN, 0}};
        // The shutdown eventfd stays readable once fired: after it, only stop() ends us.
        const bool shut = [&] {
            pollfd p{shutdown_fd_, POLLIN, 0};
            return ::poll(&p, 1, 0) == 1;
        }();
        const int n = ::poll(fds, shut ? 1 : 2, ms);
        if (n > 0 && fds[0].revents) {
            std::uint64_t v;
            [[maybe_unused]] auto r = ::read(wake_fd_.get(), &v, sizeof v);
        }
        if (shut || (n > 0 && fds[1].revents)) {
            // Shut down: nothing more to watch; wait for stop().
            std::lock_guard lock(mu_);
            deadline_.reset();
            watched_ = nullptr;
        }
    }
}

}  // namespace lazymig
