// precopy/epoch_applier.hpp — the source's side of back-replication (hybrid mode).
//
// The destination ships, every epoch, the pages the VM dirtied there plus its device
// state (pager/replicator.hpp, frames in src/protocol.hpp). The applier receives an
// epoch into its store, and only when the epoch is whole — EPOCH_BEGIN, every
// EPOCH_PAGES frame with a matching checksum, EPOCH_DEVICE, then EPOCH_END whose frame
// count and folded checksum match — writes its pages into guest RAM (process_vm_writev
// of this process's own mapping: through the kernel, up to 1024 runs a call), keeps its
// device state as the checkpoint and answers EPOCH_ACK{n}. So source memory plus the
// checkpoint is always one consistent VM image: the switchover's (epoch 0: the VM has
// been paused here since, and the device state saved then), or epoch n's.
//
// A frame whose checksum does not match, an epoch out of order, more pages than
// announced: peer_violation, and the epoch is not applied. A link lost mid-epoch ends
// run() with the partial epoch discarded.
//
// The store: one populated buffer, grown to the largest epoch seen, never beyond
// guest RAM (EPOCH_BEGIN announcing more pages than guest RAM holds is refused), reused.
//
// Threads: run() on the source's replication thread; committed(), checkpoint() and
// stats from any thread.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include "src/stats.hpp"

namespace lazymig::source {

class EpochApplier {
public:
    // `device_state`: the switchover's, the checkpoint until an epoch is applied.
    EpochApplier(std::span<const GuestRegion> regions, std::vector<std::byte> device_state,
                 std::size_t max_device_state = 64u << 20);
    ~EpochApplier();
    EpochApplier(const EpochApplier&) = delete;
    EpochApplier& operator=(const EpochApplier&) = delete;

    // Receives epochs on `reader`'s channel and acknowledges each one applied on the same
    // channel; `on_ack_sent` is called after each EPOCH_ACK left (the source's last
    // renewal of the destination's lease). Returns at a clean close between epochs or
    // with the error that ended it.
    [[nodiscard]] Result<void> run(net::FrameReader& reader, const std::function<void()>& on_ack_sent);
    // The source read COMPLETE and gave the VM up: sends RELEASE on `channel` (the one
    // run() reads; sends are serialised with its acks). Any thread.
    [[nodiscard]] Result<void> release(net::Channel& channel);

    [[nodiscard]] std::uint64_t committed() const { return committed_.load(std::memory_order_acquire); }
    [[nodiscard]] std::vector<std::byte> checkpoint() const;
    [[nodiscard]] std::uint64_t pages_applied() const { return pages_applied_.get(); }
    [[nodiscard]] LatencySummary apply_latency() const { return apply_.summary(); }

private:
    struct Piece {
        std::uint32_t region;
        std::uint64_t first, count;
        std::size_t offset;
    };
    Result<void> receive_pages(net::FrameReader& reader, const proto::Header& h, std::uint64_t announced);
    Result<void> reserve(std::size_t bytes);
    Result<void> apply();

    std::vector<GuestRegion> regions_;
    std::size_t max_device_state_;
    std::uint64_t total_bytes_ = 0;
    std::byte* store_ = nullptr;
    std::size_t store_size_ = 0, used_ = 0;
    std::uint64_t pages_ = 0;
    std::vector<Piece> pieces_;
    std::vector<std::uint32_t> crcs_;
    std::vector<const std::byte*> ptrs_;
    std::vector<std::byte> device_;
    std::mutex send_mu_;  // EPOCH_ACK (run()) and RELEASE (release()) share the channel

    mutable std::mutex mu_;
    std::vector<std::byte> checkpoint_;
    std::atomic<std::uint64_t> committed_{0};
    Counter pages_applied_;
    Histogram apply_;
};

}  // namespace lazymig::source
