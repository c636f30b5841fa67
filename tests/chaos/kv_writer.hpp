// kv_writer.hpp — the chaos runner's client of lazymig-vmm's kv workload: writes
// sequence-numbered keys while a migration is hit by a fault, records every
// acknowledgement it got, and counts duplicate outputs (a response line that answers
// no outstanding request: an ack seen twice). verify() reads every acknowledged write
// back from the VM that survived.
//
// The writer has one request outstanding at a time. When its service goes away
// (connection lost, no answer within kRequestTimeout) it tries the next port of its
// list (the VM moved, or came back on the source) and sends the unacknowledged write
// again (SET is idempotent); after kGiveUp without any ack it stops and says why.
//
// Threads: start() starts the writer thread, which the object owns; stop() ends and
// joins it (also from the destructor); wait_done() joins without asking it to stop. The accessors are for after stop().
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace chaos {

class KvWriter {
public:
    static constexpr std::chrono::milliseconds kRequestTimeout{5000};
    static constexpr std::chrono::seconds kGiveUp{40};

    // `ports`: the kv services to try, in order (the source's first).
    KvWriter(std::vector<std::uint16_t> ports, std::uint64_t max_keys);
    ~KvWriter();
    KvWriter(const KvWriter&) = delete;
    KvWriter& operator=(const KvWriter&) = delete;

    void start();
    void stop();
    // Joins the thread once it ended by itself (all its keys written, or it gave up:
    // at most kGiveUp without an ack).
    void wait_done();

    [[nodiscard]] std::uint64_t acked() const noexcept { return acked_.size(); }
    [[nodiscard]] std::uint64_t duplicates() const noexcept { return duplicates_; }
    [[nodiscard]] std::uint64_t failovers() const noexcept { return failovers_; }
    [[nodiscard]] const std::string& error() const noexcept { return error_; }

    struct Verdict {
        std::uint64_t ok = 0, missing = 0, wrong = 0;
        std::string error;  // could not ask (no service): the loss is unknown
    };
    // GETs every acknowledged key from the service on `port`.
    [[nodiscard]] Verdict verify(std::uint16_t port) const;

    [[nodiscard]] static std::string key(std::uint64_t seq);
    [[nodiscard]] static std::string value(std::uint64_t seq);

private:
    void run();

    std::vector<std::uint16_t> ports_;
    std::uint64_t max_keys_;
    std::atomic<bool> stop_{false};
    std::thread thread_;
    std::vector<std::uint64_t> acked_;  // written by the thread only; ≤ max_keys
    std::uint64_t duplicates_ = 0, failovers_ = 0;
    std::string error_;
};

}  // namespace chaos
