// events.hpp — asynchronous events for management clients, as QMP has them:
//   {"event": "MIGRATION", "data": {"status": "postcopy-active"},
//    "timestamp": {"seconds": 1700000000, "microseconds": 123456}}
// Names and data are QEMU's where QEMU has the event: MIGRATION {"status": S} with
// QEMU's MigrationStatus strings, MIGRATION_PASS {"pass": N}, STOP, RESUME (no data).
// Emitted from any thread (lazymig's hooks, the migration waiter); the QMP server thread
// polls fd() and hands the lines to every client that asked for events. The queue is
// bounded: when it is full the oldest event is dropped and counted.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "fd.hpp"

namespace vmm {

class EventBus {
public:
    static constexpr std::size_t kMaxQueued = 256;

    [[nodiscard]] static lazymig::Result<std::unique_ptr<EventBus>> create();
    // `data` null: the event has no "data" member.
    void emit(std::string_view name, nlohmann::json data = nullptr);
    [[nodiscard]] int fd() const noexcept { return wake_.fd(); }
    // The queued messages (CRLF-terminated), oldest first (called by the QMP server thread).
    [[nodiscard]] std::vector<std::string> drain();

private:
    EventBus() = default;
    EventFd wake_;
    std::mutex mu_;
    std::deque<std::string> queued_;  // <= kMaxQueued
    std::uint64_t dropped_ = 0;
};

}  // namespace vmm
