// pager/replicator.hpp — back-replication epochs, output commit and the lease (hybrid).
//
// From the moment the VM resumes on the destination (hybrid mode only), the Replicator
// ships what the VM changes back to the source, so that the source can always resume
// the VM from a consistent image if the destination is lost:
//
//   every epoch_ms:  while the vCPUs run: PAGEMAP_SCAN get-and-clear of the written
//                    pages (Pager::track_writes made every page write-protected,
//                    WP_ASYNC) and a copy of them into the staging area with
//                    process_vm_readv (through the kernel, up to 1024 runs a call);
//                    again (at most 3 passes) while a pass copied more than 512 pages
//                    and less than half of what the pass before copied;
//                    then pause_vcpus → one more get-and-clear scan → copy again the
//                    pages it reports (into their slots when staged, else appended)
//                    → save_device_state → resume_vcpus → EPOCH_BEGIN, EPOCH_PAGES...,
//                    EPOCH_DEVICE, EPOCH_END on the replication channel.
//
// Why a copy made while the vCPUs run is the epoch's image: each scan write-protects
// every page it reports before any of them is copied, so a write that lands after (or
// during) that copy makes the page written again and the next scan reports it, and its
// copy replaces the torn one. A staged page the paused scan does not report was not
// written since the scan before its last copy: that copy is what it holds at the pause.
// So the pause carries only what the vCPUs wrote during the last running pass. A guest
// that rewrites its whole working set faster than a pass copies it (the test's 10k-page
// sequential writer on an idle machine: ~1 us a page copied, ~10 ms for 10k) still
// pauses for all of it; the passes stop as soon as they stop shrinking.
//   the source:      applies an epoch only when it is whole and every checksum matched,
//                    then answers EPOCH_ACK{n} (precopy/epoch_applier.hpp).
//   EPOCH_ACK{n}:    the lease is renewed, then VmmHooks::on_epoch_committed(n) releases
//                    the output of every epoch up to n (output commit).
//   COMPLETE → RELEASE: every page arrived; the source read COMPLETE and answers RELEASE
//                    (it will never resume the VM): epochs and the lease end, all output
//                    is released. Until RELEASE the lease holds as before: a COMPLETE
//                    lost with the link must not leave this copy running while the
//                    source resumes the VM after the lease.
//
// Staging bound (Parameters::epoch_staging_bytes): when an epoch's written pages do not
// fit, the vCPUs stay paused while the staged part is sent and the rest is staged in
// the same area: the pause grows, memory does not (Stats::epoch_overflows counts it,
// and a warning is logged). At most kMaxInFlight epochs wait for their ack; past that an
// epoch tick is skipped (the kernel keeps the written bits; nothing grows here).
//
// Only pages PRESENT in the page-state table are sent: a page the guest wrote is
// present (a write to a missing page faults first); PAGEMAP_SCAN may also report a page
// it never saw written (a zero page, a hole), and a page that never arrived must not
// overwrite the source's copy. A page still PLACING is waited for (one ioctl).
//
// Lease (fencing). The destination may run the VM only while its lease holds. Every
// renewal is anchored at this side's monotonic send time of what the source answered:
// an EPOCH_ACK{n} renews from the moment EPOCH_END{n} was sent; a HEARTBEAT echo from
// the moment the oldest unanswered HEARTBEAT was sent (renew()). When the lease lapses
// the Replicator fences: no on_epoch_committed from then on, vCPUs paused, and the
// session fails (the VM never resumes here). The source resumes the VM from its last
// committed epoch only after lease × (1 + drift bound) + margin past its last renewal
// sent (src/api/source.cpp, resume_from_checkpoint): with clock rates that differ by
// less than the drift bound, the destination has fenced by then.
//
// Threads: the Replicator owns three, started by start() and joined by stop(): the
// epoch thread (the only sender on the replication channel; pauses and resumes vCPUs
// under vcpu_mu_), the ack thread (the only receiver on it) and the lease thread (waits
// for the lease's end). renew(), open_epoch(), stats() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <array>
#include <sys/uio.h>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "pager/pager.hpp"
#include "src/net/channel.hpp"
#include "src/net/socket.hpp"
#include "src/pagemap_scan.hpp"
#include "src/stats.hpp"

namespace lazymig::pager {

struct ReplicatorConfig {
    std::chrono::milliseconds epoch{50};
    std::size_t staging_bytes = 64u << 20;
    std::chrono::milliseconds lease{1000};
};

struct ReplicatorStats {
    Counter epochs_sent, epochs_committed, pages, bytes, overflows, skipped;
    Histogram pause;   // pause_vcpus → resume_vcpus of each epoch
    // The pause's steps: pause_vcpus returned; PAGEMAP_SCAN ioctls; the scan with its
    // page-state filter and the copies of staged pages again (filter); save_device_state;
    // the pages staged afresh (stage); resume_vcpus returned. Logged at stop().
    Histogram park, scan, filter, device, stage, unpark;
    Histogram prestage, prescan;  // the scan and copy made while the vCPUs run (not in the pause); its scan
    Counter prestaged_pages, paused_pages;  // copied while running / while paused
    Histogram commit;  // EPOCH_END sent → EPOCH_ACK received
    std::atomic<std::uint64_t> last_pages{0}, largest_pages{0};
};

class Replicator {
public:
    using Clock = std::chrono::steady_clock;
    static constexpr std::size_t kMaxInFlight = 4;

    // Allocates and populates the staging area and the scan bitmaps, opens PAGEMAP_SCAN
    // (at setup: populating 64 MiB inside the downtime cost ~20 ms here).
    // REQUIRES: `pager` and `hooks` outlive the Replicator.
    [[nodiscard]] static Result<std::unique_ptr<Replicator>> create(Pager& pager, const VmmHooks& hooks,
                                                                    ReplicatorConfig config);
    ~Replicator();  // stop()
    Replicator(const Replicator&) = delete;
    Replicator& operator=(const Replicator&) = delete;

    // Starts the threads on `channel` (authenticated, HELLO done). REQUIRES:
    // pager.tracking_writes(). The lease runs from
    // `lease_anchor` (this side's send time of what the source's GO answered).
    // `on_error` is called at most once, from one of the threads (a fence, a send or
    // receive failure, a bad ack). REQUIRES: the channel outlives stop().
    [[nodiscard]] Result<void> start(net::Channel& channel, Clock::time_point lease_anchor,
                                     std::function<void(const Error&)> on_error);
    // Stops and joins the threads (idempotent). The transport's shutdown must be
    // signalled too when a thread may be blocked in the channel.
    void stop();

    // The destination's watchdog sent a HEARTBEAT now / received an echo (renewal
    // anchored at the send time of the oldest unanswered beat).
    void heartbeat_sent();
    void heartbeat_echoed();
    // The epoch whose pause has not come yet: output the VMM produces now belongs to it.
    [[nodiscard]] std::uint64_t open_epoch() const { return open_.load(std::memory_order_acquire); }
    [[nodiscard]] std::uint64_t committed() const { return committed_.load(std::memory_order_acquire); }
    [[nodiscard]] bool fenced() const { return fenced_.load(std::memory_order_acquire); }
    // Every page arrived and COMPLETE was sent: from here RELEASE may come.
    void complete_sent();
    // Waits for RELEASE (the source read COMPLETE and will never resume the VM) or the
    // fence, whichever comes first; bounded by the lease. True: released, the VM runs on
    // here. False: fenced (or stopped): the source may resume the VM.
    [[nodiscard]] bool await_release();
    [[nodiscard]] const ReplicatorStats& stats() const { return stats_; }
    [[nodiscard]] std::size_t staging_bytes() const { return staging_size_; }

private:
    Replicator(Pager& pager, const VmmHooks& hooks, ReplicatorConfig config)
        : pager_(pager), hooks_(hooks), cfg_(config) {}
    void epoch_loop();
    void ack_loop();
    void lease_loop();
    Result<void> run_epoch();
    using Bitmaps = std::vector<std::vector<std::uint64_t>>;
    Result<std::uint64_t> scan(Bitmaps& bits);
    Result<void> wait_placed(std::uint32_t ri, std::uint64_t first, std::uint64_t count);
    void reset_staging();
    Result<bool> stage_next(Bitmaps& bits, std::uint64_t& staged_pages);
    Result<std::uint64_t> pass(std::uint64_t& copied);
    Result<void> read_guest(std::size_t iovs);
    Result<void> send_staged(std::uint64_t n, std::uint32_t& frames, std::uint32_t& sum, std::uint64_t pages);
    void renew(Clock::time_point anchor);
    void fail(const Error& e);
    void commit(std::uint64_t n);
    // RELEASE read (ack thread): epochs and the lease end, and every epoch's output is
    // released: on_epoch_committed(open_epoch()) once, unless fenced. Idempotent.
    void complete();

    Pager& pager_;
    const VmmHooks& hooks_;
    ReplicatorConfig cfg_;
    PagemapScan scan_;
    net::Channel* channel_ = nullptr;
    std::function<void(const Error&)> on_error_;
    std::atomic<bool> reported_{false};

    // Epoch thread only, a bit per page per region: the pages of this epoch, those not
    // staged yet, and what the last scan reported; where staging resumes, and the staged
    // pieces.
    Bitmaps epoch_, unstaged_, fresh_;
    std::uint32_t cursor_region_ = 0;
    std::uint64_t cursor_page_ = 0;
    std::size_t used_ = 0;  // staging bytes taken by pieces_
    struct Piece {
        std::uint32_t region;
        std::uint64_t first, count;
        std::size_t offset;
    };
    std::vector<Piece> pieces_;  // capacity: staging pages (each piece holds at least one)
    std::byte* staging_ = nullptr;
    std::size_t staging_size_ = 0;
    std::vector<iovec> local_iov_, remote_iov_;
    std::vector<std::uint32_t> crcs_;
    std::vector<const std::byte*> ptrs_;
    std::uint64_t scan_ns_ = 0;  // this epoch's PAGEMAP_SCAN ioctls

    std::mutex vcpu_mu_;  // held from pause_vcpus to resume_vcpus; fence() takes it
    std::atomic<std::uint64_t> open_{1}, committed_{0};
    std::atomic<bool> fenced_{false}, complete_sent_{false};

    std::mutex mu_;  // the lease, in-flight epochs, heartbeat send times, stopping_
    std::condition_variable cv_;  // stop, a renewal, an ack
    bool stopping_ = false, done_ = false;  // done_: RELEASE came (complete())
    Clock::time_point lease_end_{};
    std::array<Clock::time_point, kMaxInFlight> end_sent_{};  // by epoch % kMaxInFlight
    std::uint64_t last_sent_ = 0;
    std::array<Clock::time_point, 64> beats_{};
    std::size_t beat_head_ = 0, beat_count_ = 0;

    ReplicatorStats stats_;
    std::mutex commit_mu_;  // on_epoch_committed against the fence
    std::thread epoch_thread_, ack_thread_, lease_thread_;
};

}  // namespace lazymig::pager
