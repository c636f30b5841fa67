// api/session.hpp — what Source and Destination share: phase, first error, events.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>

#include "lazymig/lazymig.hpp"
#include "src/log.hpp"

namespace lazymig::api {

// The state every migration endpoint reports: its phase and the error that ended it.
// The first error wins; later ones (the echo of a shutdown) are logged only.
class SessionState {
public:
    explicit SessionState(const VmmHooks& hooks, std::string_view side) : hooks_(hooks), side_(side) {}

    void set_phase(Phase p, std::string_view why = {}, Event extra = {}) {
        if (p == Phase::completed || p == Phase::failed || p == Phase::cancelled) {
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
    mutable std::mutex mu_;
    std::optional<Error> error_;
    std::optional<std::chrono::steady_clock::time_point> end_;
};

[[nodiscard]] inline double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace lazymig::api
