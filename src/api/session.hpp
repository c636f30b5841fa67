// api/session.hpp — what Source and Destination share: phase, first error, events.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>

#include "lazymig/lazymig.hpp"
#include "src/log.hpp"
#include "src/net/socket.hpp"
#include "src/session_phase.hpp"

namespace lazymig::api {

// The state every migration endpoint reports: its phase and the error that ended it.
// The first error wins; later ones (the echo of a shutdown) are logged only.
class SessionState {
public:
    explicit SessionState(const VmmHooks& hooks, std::string_view side) : hooks_(hooks), side_(side) {}

    // Moves to phase `p` if src/session_phase.hpp allows it from the current one, and
    // tells the VMM; a move the state machine does not draw is logged and ignored.
    // Called by the session thread only.
    void set_phase(Phase p, std::string_view why = {}, Event extra = {}) {
        const Phase from = phase_.load(std::memory_order_acquire);
        if (!transition_allowed(from, p)) {
            LZ_LOG(error, "session_bad_transition", "side={} from={} to={} {}", side_, to_string(from), to_string(p), why);
            return;
        }
        if (terminal(p)) {
            std::lock_guard lock(mu_);
            end_ = std::chrono::steady_clock::now();
        }
        phase_.store(p, std::memory_order_release);
        LZ_LOG(info, "session_phase", "side={} phase={} {}", side_, to_string(p), why);
        extra.kind = Event::Kind::phase;
        extra.phase = p;
        extra.message = std::string(why.empty() ? to_string(p) : why);
        emit(extra);
    }
    // Milliseconds from `start` to the end of the migration, or to now while it runs.
    [[nodiscard]] double elapsed_ms(std::chrono::steady_clock::time_point start) const {
        std::lock_guard lock(mu_);
        const auto end = end_ ? *end_ : std::chrono::steady_clock::now();
        return std::chrono::duration<double, std::milli>(end - start).count();
    }
    [[nodiscard]] Phase phase() const { return phase_.load(std::memory_order_acquire); }

    // Records `e` if it is the first error; returns true if it was.
    bool record(const Error& e) {
        std::lock_guard lock(mu_);
        if (error_) {
            LZ_LOG(debug, "session_later_error", "side={} {}", side_, e.message());
            return false;
        }
        error_ = e;
        LZ_LOG(warn, "session_error", "side={} {}", side_, e.message());
        return true;
    }
    // Replaces the recorded error with a fuller account of the same failure.
    void amend(Error e) {
        std::lock_guard lock(mu_);
        error_ = std::move(e);
    }
    // The migration completed after all (an error raced with the last page): forget it.
    void forget_error() {
        std::lock_guard lock(mu_);
        if (error_) LZ_LOG(info, "session_error_forgotten", "side={} {}", side_, error_->message());
        error_.reset();
    }
    [[nodiscard]] std::optional<Error> error() const {
        std::lock_guard lock(mu_);
        return error_;
    }
    void emit(const Event& e) const {
        if (hooks_.on_event) hooks_.on_event(e);
    }

private:
    const VmmHooks& hooks_;
    std::string side_;
    std::atomic<Phase> phase_{Phase::idle};
public:
    // The session whose thread is running now (set by each thread a session starts), so
    // that wait()/cancel() from a hook on that thread can be refused instead of joining
    // the thread they run on.
    static inline thread_local const void* current = nullptr;
private:
    mutable std::mutex mu_;
    std::optional<Error> error_;
    std::optional<std::chrono::steady_clock::time_point> end_;
};

[[nodiscard]] inline double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// The link of a session that pauses and recovers (source.cpp and destination.cpp, "Link
// loss: pause and recover"). The session's own stop event ends everything; `stop` ends
// only this link's channel waits and is replaced, under `mu`, for each new link.
struct Link {
    std::mutex mu;
    std::condition_variable cv;  // the link lost, a recover() asked for, the session stopped
    net::ShutdownEvent stop;
    bool down = false;
    std::optional<Error> error;  // what took it down

    // REQUIRES: mu held. Marks the link lost with `e`: every wait on it ends.
    void lose(const Error& e, const char* event) {
        down = true;
        error = e;
        stop.signal();
        cv.notify_all();
        LZ_LOG(warn, event, "{}", e.message());
    }
    // REQUIRES: mu held. A new link, with its own stop event, replaces the lost one.
    void replace(net::ShutdownEvent fresh) {
        stop = std::move(fresh);
        down = false;
        error.reset();
    }
    [[nodiscard]] bool is_down(const net::ShutdownEvent& session_stop) {
        std::lock_guard lock(mu);
        return down && !session_stop.signalled();
    }
    [[nodiscard]] std::string why() {
        std::lock_guard lock(mu);
        return error ? error->message() : "link lost";
    }
    [[nodiscard]] int fd() {
        std::lock_guard lock(mu);
        return stop.fd();
    }
};

}  // namespace lazymig::api
