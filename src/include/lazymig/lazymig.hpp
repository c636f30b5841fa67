// lazymig/lazymig.hpp — the embedding API.
//
// A VMM owns guest RAM and vCPUs; lazymig moves the RAM. On the source:
//
//   lazymig::SourceConfig cfg{.regions = {ram.region()}, .hooks = hooks,
//                             .uri = "tcp:10.0.0.2:4444", .mode = lazymig::Mode::postcopy};
//   auto src = lazymig::Source::create(std::move(cfg));   // validates, nothing started
//   if (!src) return fail(src.error().message());
//   (*src)->migrate();   // starts; returns at once
//   ... (*src)->stats() from any thread, for progress ...
//   auto outcome = (*src)->wait();   // completed, or the error that ended it
//
// On the destination, before the source migrates:
//
//   auto dst = lazymig::Destination::listen({.regions = {ram.region()}, .hooks = hooks,
//                                            .uri = "tcp:0.0.0.0:4444"});
//   ... (*dst)->local_uri() tells the bound port ...
//   auto outcome = (*dst)->wait();   // every page present, or why not
//
// Hook call order. Source: pause_vcpus → save_device_state → (post-copy runs) → on_event
// (completed|failed). Destination: load_device_state → resume_vcpus → (faults are served
// while pages arrive) → on_event(completed). Hooks run on lazymig's session thread,
// never on a vCPU thread; pause_vcpus must return only when vCPUs are parked.
//
// Link loss during post-copy (TCP; modes postcopy and hybrid): an error of class
// transport_lost (heartbeat silence, reset, EOF, a send deadline) or pause() on either
// side moves both sides to Phase::paused. Both keep every page and all state; a vCPU that
// faults on a missing page stays blocked. recover(uri) on both sides (the destination
// first: it listens again, same or new address; then the source connects there)
// resumes: the destination says which pages it still lacks, asks again for those its
// vCPUs wait on, and post-copy goes on (Phase::recovering → postcopy). A failure while
// recovering goes back to paused; recover() may be called again. RDMA refuses both.
//
// Every pause has an end: Parameters::recover_timeout. A source paused longer fails;
// the destination may be running the VM then, so the source never resumes it. A
// destination paused longer takes the source as lost (so does cancel() while paused),
// as it does when the source is lost any other way after the destination resumed:
//   default            the VM is stopped: every page that never arrived is poisoned
//                      (UFFDIO_POISON) so that a vCPU blocked on one — or touching one
//                      later — gets SIGBUS (BUS_MCEERR_AR), never a page of zeroes; then
//                      pause_vcpus, then on_event(failed). The error names the missing
//                      pages ("ram0 pages 100..163, 900..901 and 12 more runs").
//   poison_on_loss     only the missing pages are poisoned and the vCPUs are NOT paused:
//                      the guest sees a memory error on just those pages and keeps
//                      running (Stats::vm_stopped false, pages_poisoned set).
// Event and Stats carry pages_missing either way. A VMM must handle that SIGBUS on its
// vCPU threads (as it would a hardware memory error) and its pause_vcpus must not wait
// for a vCPU it stopped.
//
// on_event(completed|failed|cancelled) is called before wait() returns, and stats().phase
// is already terminal when it is.
//
// Threads: Source and Destination each own their threads and join them in cancel()/
// wait()/the destructor. All member functions may be called from any thread except
// lazymig's own: a hook that calls wait() or cancel() on its session would wait for
// itself, so those calls are refused there with EDEADLK (cancel() then only requests
// the stop and returns).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lazymig/error.hpp"
#include "lazymig/export.h"
#include "lazymig/version.h"

namespace lazymig {

// Value 0 of every enum is invalid, as on the wire.
enum class Backing : std::uint8_t { invalid = 0, anon, memfd, hugetlbfs };
enum class Mode : std::uint8_t { invalid = 0, postcopy, precopy, hybrid };
// lz4 for pre-copy pages: automatic compresses while a running sample of pages packs to
// at most 2/3 of their size (>= 1.5x) and compressing costs less time than the bytes it
// saves on the link (the sender's CPU is not the bottleneck).
enum class Compression : std::uint8_t { invalid = 0, off, on, automatic };
enum class Phase : std::uint8_t {
    invalid = 0,
    idle,        // created, migrate() not called / destination listening
    setup,       // connecting, handshake, region table
    precopy,     // iterative rounds (precopy, hybrid)
    switchover,  // source vCPUs paused, device state moving
    postcopy,    // destination running, pages arriving
    completed,
    failed,
    cancelled,
    paused,      // post-copy, link lost or pause(): both sides keep all state and wait
                 // for recover() (see "Link loss during post-copy" above)
    recovering,  // recover() called: reconnecting, resume handshake
};
[[nodiscard]] LAZYMIG_API std::string_view to_string(Backing) noexcept;
[[nodiscard]] LAZYMIG_API std::string_view to_string(Mode) noexcept;
[[nodiscard]] LAZYMIG_API std::string_view to_string(Phase) noexcept;
[[nodiscard]] LAZYMIG_API Result<Backing> parse_backing(std::string_view) noexcept;  // "anon|memfd|hugetlbfs"
[[nodiscard]] LAZYMIG_API Result<Mode> parse_mode(std::string_view) noexcept;        // "postcopy|precopy|hybrid"

// One contiguous range of guest RAM in this process. The VMM owns the mapping.
// memfd and hugetlbfs regions must be MAP_SHARED mappings of `fd` at `fd_offset`: the
// destination writes arriving pages through a second mapping of that file.
struct GuestRegion {
    std::string name;            // "ram0"; must match the peer's region of the same index
    void* host = nullptr;        // page-aligned start of the mapping
    std::size_t size = 0;        // bytes, a multiple of page_size
    std::size_t page_size = 4096;  // 4096, or the huge page size for hugetlbfs
    Backing backing = Backing::anon;
    int fd = -1;                 // memfd / hugetlbfs file; -1 for anon
    std::uint64_t fd_offset = 0;
};

// Guest RAM allocated for a VMM (or a test): owns the mapping and the file.
class LAZYMIG_API GuestMemory {
public:
    // anon: MAP_PRIVATE|MAP_ANONYMOUS; memfd: memfd_create + MAP_SHARED; hugetlbfs:
    // memfd_create(MFD_HUGETLB) + MAP_SHARED with 2 MiB pages (fails naming
    // /proc/sys/vm/nr_hugepages when none are free). `populate` pre-faults the mapping.
    [[nodiscard]] static Result<GuestMemory> create(std::string name, std::size_t size,
                                                    Backing backing, bool populate) noexcept;
    GuestMemory() = default;
    GuestMemory(GuestMemory&&) noexcept;
    GuestMemory& operator=(GuestMemory&&) noexcept;
    GuestMemory(const GuestMemory&) = delete;
    GuestMemory& operator=(const GuestMemory&) = delete;
    ~GuestMemory();

    [[nodiscard]] GuestRegion region() const { return region_; }
    [[nodiscard]] std::byte* data() const { return static_cast<std::byte*>(region_.host); }
    [[nodiscard]] std::size_t size() const { return region_.size; }

private:
    GuestRegion region_{};
};

struct Event {
    enum class Kind : std::uint8_t { invalid = 0, phase, info, error };
    Kind kind = Kind::invalid;
    Phase phase = Phase::invalid;  // the phase after this event
    std::string message;
    std::uint64_t pages_missing = 0;  // failed after resume: pages that never arrived
    double downtime_ms = 0;           // source, from postcopy on: pause → destination resumed
};

struct VmmHooks {
    std::function<void()> pause_vcpus;    // returns when every vCPU is parked
    std::function<void()> resume_vcpus;
    // Source; in hybrid mode also the destination, at every epoch (vCPUs paused).
    std::function<Result<std::vector<std::byte>>()> save_device_state;
    // Destination; in hybrid mode also the source, when it resumes the VM from its last
    // committed epoch after losing the destination (vCPUs paused).
    std::function<Result<void>(std::span<const std::byte>)> load_device_state;
    // Output commit (hybrid mode, destination): every epoch up to `epoch` is committed at
    // the source, so output produced while Destination::open_epoch() returned a value
    // <= epoch may be released (packets, acks). Never called once the lease lapsed; at
    // completion (the source's RELEASE: it read COMPLETE and never resumes the VM) it is
    // called once more with the open epoch (everything may go out).
    std::function<void(std::uint64_t epoch)> on_epoch_committed;
    std::function<void(const Event&)> on_event;                   // any thread of lazymig's
};

// Tunable while a migration runs (migrate-set-parameters), except where noted.
struct Parameters {
    std::uint32_t bulk_channels = 0;      // bulk channels, each with its own sender and
                                          // receiver thread, splitting the push by address
                                          // range; 0 = chosen from the CPU count
                                          // (default_bulk_channels()). Fixed at migrate().
    std::uint64_t max_bandwidth = 0;      // bytes/s for the pusher; 0 = unlimited.
                                          // Demand replies are never limited.
    std::uint32_t push_batch_pages = 256; // pages per bulk frame (1 MiB of 4 KiB pages)
    std::uint32_t prefetch_pages = 16;    // most pages requested around one fault
                                          // (destination; applies to the next fault)
    // Pre-copy (modes precopy and hybrid), read at every round:
    double downtime_limit_ms = 300;       // stop-and-copy when the dirty pages left would
                                          // take at most this long at the measured bandwidth
    std::uint32_t max_rounds = 30;        // 0 = no bound
    std::uint64_t max_precopy_bytes = 0;  // bytes sent in pre-copy; 0 = no bound
    std::uint32_t max_precopy_ms = 0;     // pre-copy time; 0 = no bound
    // At a bound, precopy gives up (the VM keeps running at the source) and hybrid
    // switches to post-copy; hybrid also switches early when pre-copy diverges: the dirty
    // rate at or above the bandwidth over the last two rounds, or the dirty set not
    // shrinking over the last three.
    Compression compression = Compression::automatic;  // pre-copy pages (source)
    std::chrono::milliseconds heartbeat_timeout{2'000};  // post-copy: heartbeats cross
                                          // the urgent channel both ways (every timeout/4);
                                          // a side that receives nothing for this long
                                          // fails with class transport_lost. Fixed at
                                          // migrate() (source) / listen() (destination).
    std::chrono::milliseconds recover_timeout{60'000};  // post-copy: the longest a side
                                          // stays paused waiting for recover() before it
                                          // gives up (source: failed; destination: the
                                          // source is lost, see the top of this file).
                                          // Fixed at migrate() / listen().
    // Back-replication (hybrid mode, from the destination's resume until every page
    // arrived). Each side reads its own, fixed at migrate() / listen().
    std::uint32_t epoch_ms = 50;          // destination: an epoch every epoch_ms. 0 (both
                                          // sides, to measure its cost): no back-
                                          // replication, no lease, and the source never
                                          // resumes the VM after GO (hybrid = bounded
                                          // pre-copy + post-copy only)
    std::uint64_t epoch_staging_bytes = 64ull << 20;  // destination: the staging area an
                                          // epoch's pages are copied into (while the vCPUs
                                          // run, then again in the pause for what they
                                          // wrote meanwhile); an epoch that does not fit
                                          // keeps them paused while the staged part is sent
                                          // (Stats::epoch_overflows), memory never grows
    std::uint32_t lease_ms = 1000;        // both sides, must match: the destination runs
                                          // the VM only within lease_ms of its last
                                          // renewal (a heartbeat echo or EPOCH_ACK); the
                                          // source, the link lost, waits lease_ms × (1 +
                                          // kLeaseDriftBound) + kLeaseMargin past its
                                          // last renewal sent before it resumes the VM
};

// Fencing assumes both hosts' monotonic clocks (CLOCK_MONOTONIC) run at rates that
// differ by at most this fraction over a lease; the source adds the margin on top
// (scheduling, the time a renewal is in flight is already on the safe side: the
// destination anchors at its own send time).
inline constexpr double kLeaseDriftBound = 0.01;
inline constexpr std::chrono::milliseconds kLeaseMargin{100};

// How the channels of a migration are authenticated and encrypted (TLS 1.3, OpenSSL).
// Authentication is on by default: a Source or Destination without a key or
// certificates is refused at create()/listen(); Auth::none must be chosen explicitly,
// and then anyone who reaches the port can take the VM over.
enum class Auth : std::uint8_t { invalid = 0, psk, x509, none };
struct Security {
    Auth auth = Auth::psk;
    // psk: the per-migration key (16 to 48 bytes), given to both sides by the management
    // plane; or read from psk_file (hex, as `openssl rand -hex 32` writes it, optionally
    // "IDENTITY:HEX" as in QEMU's keys.psk; the file must not be readable by others).
    std::vector<std::byte> psk;
    std::string psk_file;
    std::string psk_identity = "lazymig";
    // x509: a directory as QEMU's tls-creds-x509 reads it: ca-cert.pem, and
    // server-cert.pem/server-key.pem (destination) or client-cert.pem/client-key.pem
    // (source). Both sides verify the other against the CA.
    std::string creds_dir;
    // x509: the name the peer's certificate must carry (subject alt name or CN); empty:
    // any certificate the CA signed (like tls-authz absent).
    std::string peer_name;
    // A connection that has not authenticated within this time is closed (destination:
    // that connection only; the listener goes on).
    std::chrono::milliseconds handshake_timeout{5'000};
};

// The number of bulk channels used when Parameters::bulk_channels is 0: one per two
// online CPUs, between 1 and 8 (a sender and a receiver thread per channel compete with
// the guest's vCPUs for the same cores).
[[nodiscard]] LAZYMIG_API std::uint32_t default_bulk_channels() noexcept;

// A VMM thread that runs guest code, named for blocktime reports (destination).
struct VcpuThread {
    int tid = 0;            // gettid() of the thread
    std::string name;       // "vcpu0"
};

// Time a vCPU thread spent blocked on pages that had not arrived (QEMU's postcopy
// blocktime): from the fault to the page's placement, summed over its faults.
struct VcpuBlocktime {
    int tid = 0;
    std::string name;       // as named by the VMM; "tid N" for threads it did not name
    std::uint64_t faults = 0;
    double blocktime_ms = 0;
};

// One bucket of the fault-latency histogram: faults that waited at most upper_us.
struct LatencyBucket {
    double upper_us = 0;
    std::uint64_t count = 0;
};

struct LatencySummary {
    std::uint64_t count = 0;
    double p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0, mean_us = 0;
};

struct Stats {
    Phase phase = Phase::invalid;
    Mode mode = Mode::invalid;
    std::uint64_t total_pages = 0;
    std::uint64_t pages_present = 0;     // destination: placed; source: sent at least once
    std::uint64_t pages_pushed = 0;      // via the bulk channel
    std::uint64_t pages_demanded = 0;    // via the urgent channel (requested by faults)
    std::uint64_t zero_pages = 0;        // sent/received as a flag
    std::uint64_t duplicate_pages = 0;   // arrived after the page was already present
    std::uint64_t faults = 0;            // destination: uffd faults on missing pages
    std::uint64_t requests = 0;          // demand requests sent (dest) / served (source)
    std::uint64_t bytes_sent = 0;
    std::uint64_t bytes_received = 0;
    std::uint64_t device_state_bytes = 0;
    std::uint64_t pages_missing = 0;     // destination, after a failure: never arrived
    bool destination_resumed = false;    // the VM runs at the destination: the source
                                         // must not resume it any more
    double downtime_ms = 0;              // pause → destination resumed
    double elapsed_ms = 0;               // since migrate()/accept, until the end
    double postcopy_ms = 0;              // resume → last page present
    LatencySummary fault_latency;        // destination: fault read → page placed
    std::vector<LatencyBucket> fault_latency_histogram;  // non-empty buckets, ascending
    double blocktime_ms = 0;             // destination: sum over vCPU threads of time
                                         // blocked on missing pages (needs THREAD_ID)
    std::vector<VcpuBlocktime> vcpu_blocktime;  // per faulting thread, named ones first
    std::uint32_t bulk_channels = 0;     // bulk channels in use
    std::string error;                   // the error that ended it, if any
    // Pre-copy (source), one entry per finished round, and how it ended:
    struct Round {
        std::uint32_t round = 0;          // 1 = the first pass over all of RAM
        std::uint64_t pages_sent = 0, zero_pages = 0, bytes_sent = 0;
        std::uint64_t dirty_pages = 0;    // written during the round: the next round's set
        double ms = 0;
        double bandwidth = 0;             // bytes/s on the wire, the round end to end (sent,
                                          // received and placed: ROUND_ACK)
        double ram_rate = 0;              // bytes/s of guest pages moved (before zero flags, lz4)
        double dirty_rate = 0;            // pages/s written during the round
        std::uint64_t compressed_pages = 0;  // sent lz4-compressed
        double compression_ratio = 0;     // their bytes / what they took on the wire; 0: none
    };
    std::vector<Round> rounds;
    std::uint64_t pages_resent = 0;       // sent again after a dirtying (source)
    std::uint64_t stale_pages = 0;        // hybrid: dirtied after their last send; fetched
                                          // again after switchover (source: sent, dest: got)
    std::string switchover;               // the decision and why ("converged: ...")
    double discard_ms = 0;                // destination: making stale pages missing again
                                          // (inside the downtime)
    std::string dirty_tracking;           // source: the method in use ("wp-async", ...)
    std::uint64_t compressed_pages = 0;   // source: pre-copy pages sent lz4-compressed
    double compression_ratio = 0;         // their bytes / their bytes on the wire; 0: none
    std::uint64_t pages_removed = 0;     // destination with a handed-over uffd: pages the
                                         // VMM discarded (UFFD_EVENT_REMOVE), served as zero
    std::string tls;                     // "userspace" (OpenSSL), "kernel" (kTLS) or "none"
    std::string auth;                    // "psk", "x509" or "none"
    std::uint64_t refused_peers = 0;     // destination: connections refused before
                                         // authentication (wrong key, silent, not TLS)
    bool uffd_user_mode_only = false;    // destination: userfaultfd catches user-mode
                                         // faults only (allow_user_mode_only)
    // Recovery (post-copy link loss, see the top of this file):
    std::uint32_t pauses = 0;            // times the migration went to Phase::paused
    std::uint32_t recoveries = 0;        // times it went from recovering back to postcopy
    std::uint64_t pages_lost_in_flight = 0;  // source: sent, but lacking at the
                                         // destination at a recover: sent again
    std::uint64_t refused_resumes = 0;   // destination: RESUMEs refused (another session)
    std::uint64_t pages_poisoned = 0;    // destination, source lost: pages poisoned
    bool vm_stopped = false;             // destination, source lost: vCPUs paused (false
                                         // with poison_on_loss: the VM runs on)
    // Back-replication (hybrid), from the destination's resume:
    std::uint64_t epochs = 0;             // destination: sent; source: applied
    std::uint64_t epochs_committed = 0;   // destination: acknowledged (output released)
    std::uint64_t epoch_pages = 0;        // destination: pages sent; source: applied
    std::uint64_t epoch_bytes = 0;        // destination: bytes sent in epochs
    std::uint64_t epoch_last_pages = 0, epoch_largest_pages = 0;  // destination
    std::uint64_t epoch_overflows = 0;    // destination: epochs larger than the staging
                                          // area (vCPUs stayed paused while part was sent)
    std::uint64_t epochs_skipped = 0;     // destination: ticks skipped, 4 epochs unacked
    LatencySummary epoch_pause;           // destination: vCPU pause of each epoch
    std::vector<LatencyBucket> epoch_pause_histogram;
    LatencySummary epoch_commit;          // destination: EPOCH_END sent → EPOCH_ACK;
                                          // source: receive-complete → applied
    bool fenced = false;                  // destination: the lease lapsed
    bool resumed_on_source = false;       // source: the VM resumed here from a checkpoint
    std::uint64_t resumed_from_epoch = 0; // source: which (0: the switchover's state)
};

// Reads `dst.size()` bytes of guest RAM from `offset` bytes into region `region`, through
// the kernel (pread, process_vm_readv, a VMM's own accessor). Called concurrently from
// several sender threads, each with its own buffer. 0 bytes short is the only success.
using PageReadFn = std::function<Result<void>(std::uint32_t region, std::uint64_t offset, std::span<std::byte> dst)>;

// How the source learns which pages the running guest wrote (pre-copy, hybrid).
//   automatic  vmm when SourceConfig::dirty_log is set, else wp_async, else wp_sync
//   wp_async   userfaultfd write-protect, WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+): no fault
//              reaches user space
//   wp_sync    userfaultfd write-protect; each first write after a scan is a fault that a
//              lazymig thread resolves
//   vmm        the VMM's own log (SourceConfig::dirty_log), e.g. a KVM dirty bitmap
enum class DirtyTracking : std::uint8_t { invalid = 0, automatic, wp_async, wp_sync, vmm };
[[nodiscard]] LAZYMIG_API std::string_view to_string(DirtyTracking) noexcept;

// The VMM's dirty log for one region: ORs into `bitmap` (bit p of word p/64 = page p of
// `region`) every page written since the previous call for that region, and clears its
// own record of them. The first call for a region (when tracking starts) must clear the
// log and may report every page. Called from lazymig's pre-copy thread.
using DirtyLogFn = std::function<Result<void>(std::uint32_t region, std::span<std::uint64_t> bitmap)>;

struct SourceConfig {
    std::vector<GuestRegion> regions;
    VmmHooks hooks;
    PageReadFn read_pages;                // optional: the VMM's reader; default pread
                                          // (file-backed) / process_vm_readv (anon)
    std::string uri;                      // "tcp:HOST:PORT" of the destination
    Mode mode = Mode::postcopy;
    Parameters parameters{};
    std::chrono::milliseconds connect_timeout{10'000};
    DirtyTracking dirty_tracking = DirtyTracking::automatic;  // pre-copy and hybrid only
    DirtyLogFn dirty_log;                 // the VMM's dirty log (DirtyTracking::vmm)
    Security security{};
    // Switchover: how long the source waits for the destination to load the device
    // state (DEVICE_LOADED). Past it the source resumes its VM (the destination never ran).
    std::chrono::milliseconds switchover_timeout{30'000};
};

class LAZYMIG_API Source {
public:
    // Validates the configuration (regions page-aligned, sizes, hooks present, uri).
    [[nodiscard]] static Result<std::unique_ptr<Source>> create(SourceConfig config);
    virtual ~Source() = default;

    // Starts the migration on lazymig's threads and returns. Fails if already started.
    [[nodiscard]] virtual Result<void> migrate() = 0;
    // Blocks until the migration ends; returns the error that ended it, if any.
    [[nodiscard]] virtual Result<void> wait() = 0;
    // Stops at once. Before switchover the source vCPUs are resumed; after it the
    // destination fails (the VM cannot be saved without the source).
    virtual void cancel() = 0;
    virtual void set_parameters(const Parameters&) = 0;
    [[nodiscard]] virtual Stats stats() const = 0;
    // Post-copy only (phase postcopy or recovering; TCP): closes this side's channels on
    // purpose; both sides go to Phase::paused. Fails with a sentence elsewhere.
    [[nodiscard]] virtual Result<void> pause() = 0;
    // Phase paused only: connects to the destination at `uri` ("tcp:HOST:PORT", which
    // may differ from the first) and resumes. Returns at once; the phases (recovering,
    // then postcopy, or paused again) and wait() tell the outcome.
    [[nodiscard]] virtual Result<void> recover(std::string uri) = 0;
};

struct DestinationConfig {
    std::vector<GuestRegion> regions;
    VmmHooks hooks;
    std::string uri;                      // "tcp:HOST:PORT" to listen on; port 0 picks one
    Parameters parameters{};
    // A userfaultfd another process created and handed over (Firecracker's UFFD handler
    // protocol, Cloud Hypervisor's handoff), or -1. With one, `regions` describe that
    // process's memory: `host` is its address there, fd -1 (pages are placed with
    // UFFDIO_COPY/ZEROPAGE into its mm; its file, if any, is not shared), and every
    // range must already be registered for MISSING faults on this uffd. Nothing is
    // registered or emptied here. With UFFD_FEATURE_EVENT_REMOVE on, a range the VMM
    // discards (MADV_DONTNEED by a balloon) reads zero from then on. lazymig owns the fd
    // from the call on, also when the call fails. The VMM's vCPUs keep running: the hooks
    // pause_vcpus/resume_vcpus may do nothing.
    int uffd = -1;
    Security security{};
    // Largest device state accepted (DEVICE_STATE is refused before allocation past it).
    std::size_t max_device_state = 64u << 20;
    // How long the authenticated source may take between its first channel and its
    // device state (region table, bulk channels), and from DEVICE_LOADED to GO.
    std::chrono::milliseconds setup_timeout{30'000};
    // Without full userfaultfd (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE),
    // listen() fails saying how to grant it. true: use user-mode-only userfaultfd
    // instead — then a kernel access to a missing page (vhost, O_DIRECT into guest
    // RAM, a syscall's buffer) fails with EFAULT instead of waiting for the page.
    bool allow_user_mode_only = false;
    // When the source is lost after the VM resumed here (see the top of this file):
    // false stops the VM; true poisons only the pages that never arrived and lets the
    // vCPUs run on.
    bool poison_on_loss = false;
};

class LAZYMIG_API Destination {
public:
    // Prepares guest RAM (registers it with userfaultfd, populates memfd aliases; or
    // adopts config.uffd) and listens. Errors name the missing kernel feature or permission.
    [[nodiscard]] static Result<std::unique_ptr<Destination>> listen(DestinationConfig config);
    virtual ~Destination() = default;

    [[nodiscard]] virtual std::string local_uri() const = 0;  // with the bound port
    // Names the VMM's vCPU threads for blocktime (any time; replaces the earlier list).
    virtual void set_vcpu_threads(std::vector<VcpuThread> threads) = 0;
    [[nodiscard]] virtual Result<void> wait() = 0;
    // cancel() while paused: the source is lost (see the top of this file).
    virtual void cancel() = 0;
    virtual void set_parameters(const Parameters&) = 0;
    [[nodiscard]] virtual Stats stats() const = 0;
    // As Source::pause().
    [[nodiscard]] virtual Result<void> pause() = 0;
    // Phase paused only: listens again on `uri` (same or new address, same credentials;
    // port 0 picks one, local_uri() then tells it) for the source's recover(). Returns
    // once listening.
    [[nodiscard]] virtual Result<void> recover(std::string uri) = 0;
    // Output commit (hybrid mode). The epoch that output produced now belongs to: read it
    // after the guest state change the output reports (a kv write applied), hold the
    // output, and release it when on_epoch_committed(m) arrives with m >= that epoch.
    // The epoch closes at its vCPU pause, which captures every change made before, so the
    // rule never releases output whose state the source could lose. 0 in other modes and
    // before the VM resumed here (nothing to hold).
    [[nodiscard]] virtual std::uint64_t open_epoch() const = 0;
};

}  // namespace lazymig
