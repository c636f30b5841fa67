#include "events.hpp"

#include <chrono>

#include "log.hpp"
#include "qmp_json.hpp"

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
    // QEMU's member order; an event without data (STOP, RESUME) has no "data" member.
    nlohmann::ordered_json e;
    e["event"] = name;
    if (!data.is_null()) e["data"] = std::move(data);
    nlohmann::ordered_json ts;
    ts["seconds"] = us / 1'000'000;
    ts["microseconds"] = us % 1'000'000;
    e["timestamp"] = std::move(ts);
    std::string line = qmp_message(e);
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
