#include "events.hpp"

#include <chrono>

#include "log.hpp"

namespace vmm {

lazymig::Result<std::unique_ptr<EventBus>> EventBus::create() {
    auto wake = EventFd::create();
    if (!wake) return std::unexpected(wake.error().wrap("event bus"));
    std::unique_ptr<EventBus> b(new EventBus);
    b->wake_ = std::move(*wake);
    return b;
}

void EventBus::emit(std::string_view name, nlohmann::json data) {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                        std::chrono::system_clock::now().time_since_epoch()).count();
    std::string line = nlohmann::json{{"event", name}, {"data", std::move(data)},
                                      {"timestamp", {{"seconds", us / 1'000'000}, {"microseconds", us % 1'000'000}}}}
                           .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    {
        std::lock_guard lock(mu_);
        if (queued_.size() == kMaxQueued) {
            queued_.pop_front();
            if (dropped_++ == 0) log_event("qmp_events_dropped", "reason=queue-full capacity={}", kMaxQueued);
        }
        queued_.push_back(std::move(line));
    }
    wake_.signal();
}

std::vector<std::string> EventBus::drain() {
    wake_.drain();
    std::lock_guard lock(mu_);
    std::vector<std::string> out(std::make_move_iterator(queued_.begin()), std::make_move_iterator(queued_.end()));
    queued_.clear();
    return out;
}

}  // namespace vmm
