// tests/flag.hpp — a one-shot event between test threads.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace lazymig::test {

// wait_for() is a failure detector, not a pause: false means "never happened".
class Flag {
public:
    void set() {
        {
            std::lock_guard lock(mu_);
            set_ = true;
        }
        cv_.notify_all();
    }
    [[nodiscard]] bool wait_for(std::chrono::milliseconds limit = std::chrono::seconds(60)) {
        std::unique_lock lock(mu_);
        return cv_.wait_for(lock, limit, [&] { return set_; });
    }
    [[nodiscard]] bool is_set() {
        std::lock_guard lock(mu_);
        return set_;
    }

private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool set_ = false;
};

}  // namespace lazymig::test
