// pager/rdma_pull.hpp — the destination pulls every page itself, by RDMA READ from the
// source's registered guest memory (net/rdma.hpp). No source CPU on the data path.
//
//   auto pull = RdmaPuller::setup(pager, ureader, send, host, session, stop_fd, on_error);
//   pager.set_request_sink(pull->get());   // faults become READs on the fault QP
//   ... bulk channel 0 carries ZERO_BITMAP, SAMPLE_CRCS, SCAN_DONE → pull->on_frame()
//   pull->stop();                          // joins its threads
//
// Two RC queue pairs, each with its own completion queue: faults never wait behind bulk.
//   faults: the fault thread claims the requested pages (→ PLACING: nobody else may write
//           them) and posts one READ per run straight into the placement target — for a
//           file (memfd) the file's own pages through a second, registered mapping of
//           the file, then UFFDIO_CONTINUE: zero copy; for anonymous memory a registered
//           staging slot, then UFFDIO_COPY. Its completion thread maps and wakes.
//   bulk:   after the source's zero bitmap arrived, one thread sweeps the regions in
//           batches (one READ per run of claimed non-zero pages, only the last of a batch
//           signalled, at most kBulkInFlight batches outstanding), jumping first to the
//           neighbourhood of the latest fault; zero pages are mapped without a read.
//           Pages the source sampled are checked against its CRC32C before mapping.
//
// The page-state table stays the only authority: a page is read by whoever claimed it.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "pager/pager.hpp"
#include "src/net/frames.hpp"
#include "src/net/rdma.hpp"

namespace lazymig::pager {

struct RdmaPullReport {
    std::string device;
    bool source_on_demand = false;
    std::uint64_t fault_reads = 0, bulk_reads = 0, samples_checked = 0;
};

class RdmaPuller final : public RequestSink {
public:
    using Send = std::function<Result<void>(const proto::Frame&)>;
    // On the session thread, after REGION_ACK: listens on `host` (rdma_cm), tells the port
    // (RDMA_LISTEN), accepts the source's two QPs (their private data must carry
    // `session`), reads RDMA_REGIONS, registers local memory, answers RDMA_READY and
    // starts the fault completion thread. `on_error` is called once, on a pull thread.
    [[nodiscard]] static Result<std::unique_ptr<RdmaPuller>> setup(Pager& pager, net::FrameReader& urgent, const Send& send,
                                                                   const std::string& host, std::uint64_t session,
                                                                   int stop_fd, std::function<void(const Error&)> on_error);
    ~RdmaPuller() override;

    // Fault thread: never blocks (RequestSink).
    Result<void> request(std::uint32_t ri, std::uint64_t first, std::uint32_t count) override;
    // Bulk channel 0's receiver: ZERO_BITMAP, SAMPLE_CRCS, SCAN_DONE (which starts the
    // bulk pull). Returns false for any other frame type.
    [[nodiscard]] Result<bool> on_frame(const proto::Header& h, std::span<const std::byte> payload,
                                        std::string_view where);
    // Ends and joins both threads (idempotent). REQUIRES: the stop eventfd fired, or
    // every page is present.
    void stop();
    [[nodiscard]] RdmaPullReport report() const;

private:
    struct Piece {
        std::uint32_t ri = 0;
        std::uint64_t first = 0;
        std::uint32_t count = 0;
    };
    struct Target {
        std::byte* base = nullptr;  // where page p of the region lands (file mapping), or null
        std::size_t map_len = 0;
        net::rdma::MemoryRegion mr;
        proto::RdmaRegion remote;
    };
    RdmaPuller(Pager& pager, int stop_fd, std::function<void(const Error&)> on_error);
    Result<void> register_local();
    Result<void> post_fault(const Piece& p, std::uint32_t slot);  // REQUIRES: mu_ held
    void fault_completions();
    void bulk_pull();
    Result<void> bulk_sweep();
    void fail(const Error& e);

    Pager& pager_;
    int stop_fd_;
    std::function<void(const Error&)> on_error_;
    std::atomic<bool> failed_{false};
    std::string device_;
    bool source_odp_ = false;
    std::unique_ptr<net::rdma::Listener> listener_;
    std::unique_ptr<net::rdma::QueuePair> fault_qp_, bulk_qp_;  // share one protection domain
    std::vector<Target> targets_;
    // Anonymous regions: registered staging for fault slots and bulk batches.
    std::byte* staging_ = nullptr;
    std::size_t staging_len_ = 0, slot_bytes_ = 0, batch_bytes_ = 0;
    net::rdma::MemoryRegion staging_mr_;
    // Fault side: slot → piece in flight; pieces waiting for a free slot (bounded).
    std::mutex mu_;
    std::vector<Piece> slots_;
    std::vector<std::uint32_t> free_slots_;
    std::deque<Piece> waiting_;
    std::atomic<std::uint64_t> hint_{~0ull};  // (region << 48) | page of the latest fault
    // Bulk side, filled by on_frame before SCAN_DONE (then read by the bulk thread only).
    std::vector<std::vector<std::uint8_t>> zero_;
    std::vector<std::unordered_map<std::uint64_t, std::uint32_t>> samples_;
    std::atomic<std::uint64_t> fault_reads_{0}, bulk_reads_{0}, samples_checked_{0};
    std::thread fault_thread_, bulk_thread_;
};

}  // namespace lazymig::pager
