// uffd/uffd.hpp — a thin owner of one userfaultfd.
//
//   auto u = lazymig::uffd::Uffd::open(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM);
//   if (!u) return u.error();
//   auto ioctls = u->register_range(guest, len, UFFDIO_REGISTER_MODE_MISSING);
//   ... poll(u->fd()) ... u->read_events(batch) ... u->copy(addr, page, 4096);
//
// No threads and no policy live here: a wrapper per ioctl, a feature probe, and the
// event reader. All calls are thread-safe in the kernel's sense (ioctls on one uffd may
// be issued from any thread concurrently); the object itself is move-only and its
// owner closes the fd.
//
// Kernel hazards worth knowing (see userfaultfd(2) and Documentation/admin-guide/mm/
// userfaultfd.rst):
//  - While a REMOVE/UNMAP/REMAP event is pending (EVENT_* features on), every
//    placement ioctl fails with EAGAIN until the event has been read and the thread
//    that caused it has resumed: for a moment after the read EAGAIN persists, so
//    EAGAIN with nothing done means "retry", never "fatal".
//  - COPY/ZEROPAGE/CONTINUE/MOVE stop at the first page that is already mapped and
//    report the bytes done before it; the ioctl then fails with EAGAIN if some bytes
//    were done, or with EEXIST if none were. IoctlOutcome keeps these apart.
//  - Closing the fd while faults are pending resolves them as if no uffd had been
//    registered: anonymous memory reads as zeroes. Never close it while the guest can
//    still touch a page that has not arrived (poison those pages first).
#pragma once

#include <linux/ioctl.h>  // _IOWR for kIoctlMove/kIoctlPoison below
#include <linux/userfaultfd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "lazymig/error.hpp"

// Constants newer than Debian 12's <linux/userfaultfd.h> (kernel 6.1 headers).
// Values from the kernel's include/uapi/linux/userfaultfd.h; presence is probed at run time.
#ifndef UFFD_FEATURE_THREAD_ID  // Linux 4.14; in Debian 12's headers, kept for older ones
#define UFFD_FEATURE_THREAD_ID (1 << 8)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP  // Linux 6.3: map the page write-protected
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif

namespace lazymig::uffd {

// Mirrors of the kernel structs the old headers lack (layout is ABI).
struct uffdio_move_arg {
    std::uint64_t dst, src, len, mode;
    std::int64_t move;
};
struct uffdio_poison_arg {
    struct uffdio_range range;
    std::uint64_t mode;
    std::int64_t updated;
};
inline constexpr unsigned long kIoctlMove = _IOWR(UFFDIO, _UFFDIO_MOVE, uffdio_move_arg);
inline constexpr unsigned long kIoctlPoison = _IOWR(UFFDIO, _UFFDIO_POISON, uffdio_poison_arg);
inline constexpr std::uint64_t kMoveModeDontWake = 1ull << 0;
inline constexpr std::uint64_t kMoveModeAllowSrcHoles = 1ull << 1;
inline constexpr std::uint64_t kPoisonModeDontWake = 1ull << 0;

// What the running kernel offers, probed once (UFFDIO_API on a throwaway fd).
struct Features {
    std::uint64_t api_features = 0;  // UFFD_FEATURE_* the kernel reported
    std::uint64_t api_ioctls = 0;    // 1 << _UFFDIO_* the API ioctl reported
    bool opened_via_dev = false;     // the syscall was refused and /dev/userfaultfd worked
    bool user_mode_only = false;     // only UFFD_USER_MODE_ONLY was permitted

    [[nodiscard]] bool has(std::uint64_t feature_bits) const {
        return (api_features & feature_bits) == feature_bits;
    }
    // Names of the bits of `wanted` the kernel lacks, "MINOR_SHMEM, MOVE"; empty if none.
    [[nodiscard]] std::string missing(std::uint64_t wanted) const;
    // All supported features by name, for logs and `query` output.
    [[nodiscard]] std::string describe() const;
};

// Name of one UFFD_FEATURE_* bit given as its mask (UFFD_FEATURE_MINOR_SHMEM ->
// "MINOR_SHMEM"), "bit N" for unknown ones; several bits are joined with '|'.
[[nodiscard]] std::string feature_name(std::uint64_t bit);

// Result of a range ioctl (COPY, ZEROPAGE, CONTINUE, MOVE, POISON).
// REQUIRES: check err before trusting that `len` bytes were done.
struct [[nodiscard]] IoctlOutcome {
    std::size_t done = 0;  // bytes the kernel completed from the start of the range
    int err = 0;           // 0: the whole range; EEXIST: the page at `done` was already
                           // mapped; EAGAIN with done > 0: stopped early at `done` (one call
                           // cannot tell why: retry from `done`, usually to see EEXIST);
                           // EAGAIN with done == 0: a mapping change is pending (read events,
                           // retry); other errno: failure at `done`
    [[nodiscard]] bool ok() const { return err == 0; }
};

// One message read from the uffd.
struct Event {
    enum class Kind : std::uint8_t { invalid = 0, pagefault, fork, remap, remove, unmap };
    Kind kind = Kind::invalid;
    std::uint64_t address = 0;  // pagefault: faulting address (page aligned unless EXACT_ADDRESS);
                                // remove/unmap: start; remap: old address
    std::uint64_t end = 0;      // remove/unmap: end (exclusive); remap: new address
    std::uint64_t len = 0;      // remap: length
    std::uint64_t flags = 0;    // pagefault: UFFD_PAGEFAULT_FLAG_WRITE/WP/MINOR
    std::uint32_t tid = 0;      // pagefault: the faulting thread (gettid()) when the uffd was
                                // opened with UFFD_FEATURE_THREAD_ID; 0 without it (the
                                // kernel zeroes the field), never a guess
    int fork_fd = -1;           // fork: the child's new uffd (caller owns and must close it)

    [[nodiscard]] bool is_minor() const { return flags & UFFD_PAGEFAULT_FLAG_MINOR; }
    [[nodiscard]] bool is_write() const { return flags & UFFD_PAGEFAULT_FLAG_WRITE; }
    [[nodiscard]] bool is_wp() const { return flags & UFFD_PAGEFAULT_FLAG_WP; }
};

class Uffd {
public:
    // Probes what this kernel supports. Tries userfaultfd(2), then /dev/userfaultfd
    // (USERFAULTFD_IOC_NEW), then userfaultfd(UFFD_USER_MODE_ONLY). When all are refused
    // the error says how to grant access: `sysctl vm.unprivileged_userfaultfd=1`, or
    // read-write access to /dev/userfaultfd, or CAP_SYS_PTRACE.
    [[nodiscard]] static Result<Features> probe() noexcept;

    // Opens a uffd (O_CLOEXEC | O_NONBLOCK) and completes the API handshake asking for
    // `wanted` UFFD_FEATURE_* bits. A missing feature is an error naming it
    // ("userfaultfd: kernel lacks MINOR_SHMEM, MOVE"), never a silent downgrade.
    [[nodiscard]] static Result<Uffd> open(std::uint64_t wanted_features) noexcept;

    // Takes ownership of a userfaultfd another process created and handed over (SCM_RIGHTS):
    // its API handshake is done and its ranges are registered in that process's mm, so
    // placement ioctls act there. The features it was opened with are read from
    // /proc/self/fdinfo (the kernel prints them as "API:\t<api>:<features>:<ioctls>");
    // the fd is made non-blocking. An fd that is not a userfaultfd is refused naming it.
    // On failure the fd is closed.
    [[nodiscard]] static Result<Uffd> adopt(int fd) noexcept;

    Uffd() = default;
    Uffd(Uffd&& other) noexcept;
    Uffd& operator=(Uffd&& other) noexcept;
    Uffd(const Uffd&) = delete;
    Uffd& operator=(const Uffd&) = delete;
    ~Uffd();

    [[nodiscard]] int fd() const { return fd_; }
    [[nodiscard]] bool valid() const { return fd_ >= 0; }
    [[nodiscard]] const Features& features() const { return features_; }
    [[nodiscard]] std::uint64_t enabled_features() const { return enabled_; }

    // UFFDIO_REGISTER with UFFDIO_REGISTER_MODE_* bits; returns the range's ioctl mask
    // (1 << _UFFDIO_COPY | ...), from which callers learn e.g. whether CONTINUE works there.
    [[nodiscard]] Result<std::uint64_t> register_range(void* addr, std::size_t len,
                                                       std::uint64_t modes) noexcept;
    [[nodiscard]] Result<void> unregister_range(void* addr, std::size_t len) noexcept;

    // Placement. `mode` takes the ioctl's own MODE_* bits (e.g. DONTWAKE, WP).
    IoctlOutcome copy(void* dst, const void* src, std::size_t len, std::uint64_t mode = 0) noexcept;
    IoctlOutcome zeropage(void* dst, std::size_t len, std::uint64_t mode = 0) noexcept;
    IoctlOutcome continue_range(void* dst, std::size_t len, std::uint64_t mode = 0) noexcept;
    IoctlOutcome move(void* dst, void* src, std::size_t len, std::uint64_t mode = 0) noexcept;
    IoctlOutcome poison(void* dst, std::size_t len, std::uint64_t mode = 0) noexcept;

    // UFFDIO_WRITEPROTECT: protect (wp=true) or unprotect a range.
    [[nodiscard]] Result<void> writeprotect(void* addr, std::size_t len, bool wp,
                                            bool dontwake = false) noexcept;
    // UFFDIO_WAKE: wakes threads blocked on faults in the range.
    [[nodiscard]] Result<void> wake(void* addr, std::size_t len) noexcept;

    // Reads up to out.size() messages without blocking. Returns the count (0 when none is
    // queued). Unknown message types are an error naming the type.
    [[nodiscard]] Result<std::size_t> read_events(std::span<Event> out) noexcept;

    // Closes the fd now (the destructor does the same). See the hazard above.
    void close() noexcept;

private:
    Uffd(int fd, Features features, std::uint64_t enabled) : fd_(fd), features_(features), enabled_(enabled) {}
    int fd_ = -1;
    Features features_{};
    std::uint64_t enabled_ = 0;
};

}  // namespace lazymig::uffd
