// uffd/uffd.cpp — the userfaultfd wrappers declared in uffd.hpp.
//
// Each wrapper captures errno on the failing line and names the call with its
// arguments (addresses in hex, lengths in bytes). Range ioctls keep the kernel's three
// outcomes apart (see range_ioctl below); nothing here retries, sleeps or picks a policy.
#include "uffd/uffd.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstring>
#include <initializer_list>
#include <string_view>
#include <utility>

namespace lazymig::uffd {
namespace {

// UFFD_FEATURE_* bit N is named kFeatureNames[N] (include/uapi/linux/userfaultfd.h).
constexpr std::array<std::string_view, 17> kFeatureNames = {
    "PAGEFAULT_FLAG_WP", "EVENT_FORK",     "EVENT_REMAP",        "EVENT_REMOVE",
    "MISSING_HUGETLBFS", "MISSING_SHMEM",  "EVENT_UNMAP",        "SIGBUS",
    "THREAD_ID",         "MINOR_HUGETLBFS", "MINOR_SHMEM",       "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON",            "WP_ASYNC",
    "MOVE",
};

std::string hex(std::uint64_t v) {
    char buf[2 + 16] = {'0', 'x'};
    const auto r = std::to_chars(buf + 2, buf + sizeof buf, v, 16);
    return std::string(buf, r.ptr);
}

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// "EPERM (errno 1)": the symbolic name keeps a chain of attempts readable.
std::string errno_text(int e) {
    const char* name = strerrorname_np(e);
    return std::string(name ? name : "E?") + " (errno " + std::to_string(e) + ")";
}

// Names of the set bits of `bits`, joined by `sep`; "bit N" for bits without a name.
std::string bit_names(std::uint64_t bits, std::string_view sep) {
    std::string out;
    for (unsigned i = 0; i < 64; ++i) {
        if (!(bits & (1ull << i))) continue;
        if (!out.empty()) out += sep;
        if (i < kFeatureNames.size()) out += kFeatureNames[i];
        else out += "bit " + std::to_string(i);
    }
    return out;
}

// Names of MODE bits for error text: `names[i]` is bit i; unknown bits in hex.
std::string mode_text(std::uint64_t mode, std::initializer_list<std::string_view> names) {
    if (mode == 0) return "0";
    std::string out;
    unsigned i = 0;
    for (auto name : names) {
        if (mode & (1ull << i)) {
            if (!out.empty()) out += '|';
            out += name;
            mode &= ~(1ull << i);
        }
        ++i;
    }
    if (mode != 0) out += (out.empty() ? "" : "|") + hex(mode);
    return out;
}

std::string range_text(std::string_view call, std::uint64_t start, std::uint64_t len) {
    return std::string(call) + " start=" + hex(start) + " len=" + std::to_string(len);
}

struct Opened {
    int fd = -1;
    bool via_dev = false;
    bool user_mode_only = false;
};

// userfaultfd(2) first; when it is refused (EPERM: vm.unprivileged_userfaultfd=0 and
// no CAP_SYS_PTRACE; ENOSYS: syscall filtered), /dev/userfaultfd, whose access is
// governed by file permissions instead; last, UFFD_USER_MODE_ONLY, which the syscall
// always permits but which leaves faults taken inside the kernel (read(2) into guest
// memory, get_user_pages) unhandled: they fail with EFAULT.
Result<Opened> open_fd() noexcept {
    constexpr int flags = O_CLOEXEC | O_NONBLOCK;
    int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
    if (fd >= 0) return Opened{fd, false, false};
    const int sys_err = errno;
    if (sys_err != EPERM && sys_err != ENOSYS)
        return sys_error("userfaultfd(O_CLOEXEC|O_NONBLOCK)", sys_err);
    std::string tried = "userfaultfd(O_CLOEXEC|O_NONBLOCK): " + errno_text(sys_err);

    const int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ::ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        const int e = errno;
        ::close(dev);
        if (fd >= 0) return Opened{fd, true, false};
        tried += "; ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW, O_CLOEXEC|O_NONBLOCK): " +
                 errno_text(e);
    } else {
        tried += "; open(/dev/userfaultfd, O_RDWR): " + errno_text(errno);
    }

    fd = static_cast<int>(::syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY));
    if (fd >= 0) return Opened{fd, false, true};
    tried += "; userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY): " + errno_text(errno);
    return sys_error(
        "userfaultfd: every way to open one was refused (" + tried +
            "); to allow it, run `sysctl vm.unprivileged_userfaultfd=1`, or give this user "
            "read-write access to /dev/userfaultfd (e.g. a group or an ACL), or grant "
            "CAP_SYS_PTRACE",
        sys_err);
}

// UFFDIO_API may be issued once per fd. With features=0 the kernel still reports every
// feature and ioctl it supports, which is what probe() relies on.
Result<uffdio_api> handshake(int fd, std::uint64_t features) noexcept {
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = features;
    if (::ioctl(fd, UFFDIO_API, &api) == 0) return api;
    const int e = errno;
    std::string what = "UFFDIO_API api=" + hex(UFFD_API) + " features=" + hex(features);
    if (features != 0) what += " (" + bit_names(features, ", ") + ")";
    if (e == EPERM && (features & UFFD_FEATURE_EVENT_FORK))
        what += ": EVENT_FORK needs CAP_SYS_PTRACE";
    return sys_error(std::move(what), e);
}

// COPY, ZEROPAGE, CONTINUE, MOVE and POISON share one contract (mm/userfaultfd.c):
// the result field receives the bytes done, or -errno when nothing was done; the
// ioctl returns 0 only when the whole range was done and -EAGAIN when part of it was.
// A partial result does not say why the kernel stopped (usually the page at `done`
// is already mapped): callers retry from `done` and then see the reason, e.g. EEXIST.
// Argument checks (alignment, unknown mode bits) fail before the field is written,
// so it is zeroed first and an untouched field means "report the ioctl's errno".
template <class Arg, class Field>
IoctlOutcome range_ioctl(int fd, unsigned long request, Arg& arg, Field Arg::*result,
                         std::size_t len) noexcept {
    arg.*result = 0;
    if (::ioctl(fd, request, &arg) == 0) return {len, 0};
    const int e = errno;
    const auto r = static_cast<std::int64_t>(arg.*result);
    if (r > 0) return {static_cast<std::size_t>(r), e};
    if (r < 0) return {0, static_cast<int>(-r)};
    return {0, e};
}

// Converts one message; fork_fd ownership passes to the returned Event.
Result<Event> to_event(const uffd_msg& m) noexcept {
    Event ev;
    switch (m.event) {
    case UFFD_EVENT_PAGEFAULT:
        ev.kind = Event::Kind::pagefault;
        ev.address = m.arg.pagefault.address;
        ev.flags = m.arg.pagefault.flags;
        ev.tid = m.arg.pagefault.feat.ptid;
        return ev;
    case UFFD_EVENT_FORK:
        ev.kind = Event::Kind::fork;
        ev.fork_fd = static_cast<int>(m.arg.fork.ufd);
        return ev;
    case UFFD_EVENT_REMAP:
        ev.kind = Event::Kind::remap;
        ev.address = m.arg.remap.from;
        ev.end = m.arg.remap.to;
        ev.len = m.arg.remap.len;
        return ev;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        ev.kind = m.event == UFFD_EVENT_REMOVE ? Event::Kind::remove : Event::Kind::unmap;
        ev.address = m.arg.remove.start;
        ev.end = m.arg.remove.end;
        return ev;
    default:
        return logic_error("userfaultfd: read a message of unknown type " +
                           std::to_string(m.event) + " (" + hex(m.event) + ")");
    }
}

}  // namespace

std::string feature_name(std::uint64_t bit) {
    if (bit == 0) return "none";
    return bit_names(bit, "|");
}

std::string Features::missing(std::uint64_t wanted) const {
    return bit_names(wanted & ~api_features, ", ");
}

std::string Features::describe() const {
    return api_features == 0 ? "none" : bit_names(api_features, ", ");
}

Result<Features> Uffd::probe() noexcept {
    auto opened = open_fd();
    if (!opened) return std::unexpected(opened.error());
    auto api = handshake(opened->fd, 0);
    ::close(opened->fd);
    if (!api) return std::unexpected(api.error().wrap("userfaultfd feature probe"));
    return Features{api->features, api->ioctls, opened->via_dev, opened->user_mode_only};
}

Result<Uffd> Uffd::open(std::uint64_t wanted_features) noexcept {
    auto probed = probe();
    if (!probed) return std::unexpected(probed.error());
    if (auto lacking = probed->missing(wanted_features); !lacking.empty())
        return logic_error("userfaultfd: kernel lacks " + lacking);

    auto opened = open_fd();
    if (!opened) return std::unexpected(opened.error());
    Uffd u(opened->fd, Features{}, 0);  // owns the fd from here: error paths close it
    auto api = handshake(u.fd_, wanted_features);
    if (!api) return std::unexpected(api.error());
    u.features_ = Features{api->features, api->ioctls, opened->via_dev, opened->user_mode_only};
    // The kernel turns WP_UNPOPULATED on with WP_ASYNC, which relies on it.
    u.enabled_ = wanted_features;
    if (wanted_features & UFFD_FEATURE_WP_ASYNC) u.enabled_ |= UFFD_FEATURE_WP_UNPOPULATED;
    return u;
}

Result<Uffd> Uffd::adopt(int fd) noexcept {
    Uffd u(fd, Features{}, 0);  // owns the fd from here: error paths close it
    const std::string path = "/proc/self/fdinfo/" + std::to_string(fd);
    const int info = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (info < 0) return sys_error("userfaultfd adopt: open " + path);
    char buf[1024];
    const ssize_t n = ::read(info, buf, sizeof buf - 1);
    const int read_errno = errno;
    ::close(info);
    if (n < 0) return sys_error("userfaultfd adopt: read " + path, read_errno);
    const std::string_view text(buf, static_cast<std::size_t>(n));
    const auto at = text.find("\nAPI:\t");
    if (at == std::string_view::npos)
        return logic_error("userfaultfd adopt: fd " + std::to_string(fd) + " is not a userfaultfd (" + path +
                           " has no API line)");
    // "API:\t<api hex>:<features hex>:<ioctls hex>"
    const std::string_view api = text.substr(at + 6);
    const auto c1 = api.find(':'), c2 = api.find(':', c1 + 1);
    std::uint64_t features = 0, ioctls = 0;
    if (c1 == std::string_view::npos || c2 == std::string_view::npos ||
        std::from_chars(api.data() + c1 + 1, api.data() + c2, features, 16).ec != std::errc{} ||
        std::from_chars(api.data() + c2 + 1, api.data() + api.size(), ioctls, 16).ec != std::errc{})
        return logic_error("userfaultfd adopt: cannot parse the API line of " + path);
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0) return sys_error("userfaultfd adopt: fcntl(F_GETFL) fd " + std::to_string(fd));
    if (!(flags & O_NONBLOCK) && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
        return sys_error("userfaultfd adopt: fcntl(F_SETFL, O_NONBLOCK) fd " + std::to_string(fd));
    features &= ~(1ull << 31);  // UFFD_FEATURE_INITIALIZED, the kernel's own bit (fs/userfaultfd.c)
    u.features_ = Features{features, ioctls, false, false};
    u.enabled_ = features;
    return u;
}

Uffd::Uffd(Uffd&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), features_(other.features_),
      enabled_(std::exchange(other.enabled_, 0)) {}

Uffd& Uffd::operator=(Uffd&& other) noexcept {
    if (this != &other) {
        close();
        fd_ = std::exchange(other.fd_, -1);
        features_ = other.features_;
        enabled_ = std::exchange(other.enabled_, 0);
    }
    return *this;
}

Uffd::~Uffd() { close(); }

void Uffd::close() noexcept {
    // No retry on EINTR: Linux releases the descriptor even then.
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
}

Result<std::uint64_t> Uffd::register_range(void* addr_, std::size_t len,
                                           std::uint64_t modes) noexcept {
    uffdio_register reg{};
    reg.range = {addr(addr_), len};
    reg.mode = modes;
    if (::ioctl(fd_, UFFDIO_REGISTER, &reg) != 0)
        return sys_error(range_text("UFFDIO_REGISTER", addr(addr_), len) + " mode=" +
                         mode_text(modes, {"MISSING", "WP", "MINOR"}));
    return reg.ioctls;
}

Result<void> Uffd::unregister_range(void* addr_, std::size_t len) noexcept {
    uffdio_range range{addr(addr_), len};
    if (::ioctl(fd_, UFFDIO_UNREGISTER, &range) != 0)
        return sys_error(range_text("UFFDIO_UNREGISTER", addr(addr_), len));
    return {};
}

IoctlOutcome Uffd::copy(void* dst, const void* src, std::size_t len, std::uint64_t mode) noexcept {
    uffdio_copy arg{};
    arg.dst = addr(dst);
    arg.src = addr(src);
    arg.len = len;
    arg.mode = mode;
    return range_ioctl(fd_, UFFDIO_COPY, arg, &uffdio_copy::copy, len);
}

IoctlOutcome Uffd::zeropage(void* dst, std::size_t len, std::uint64_t mode) noexcept {
    uffdio_zeropage arg{};
    arg.range = {addr(dst), len};
    arg.mode = mode;
    return range_ioctl(fd_, UFFDIO_ZEROPAGE, arg, &uffdio_zeropage::zeropage, len);
}

IoctlOutcome Uffd::continue_range(void* dst, std::size_t len, std::uint64_t mode) noexcept {
    uffdio_continue arg{};
    arg.range = {addr(dst), len};
    arg.mode = mode;
    return range_ioctl(fd_, UFFDIO_CONTINUE, arg, &uffdio_continue::mapped, len);
}

IoctlOutcome Uffd::move(void* dst, void* src, std::size_t len, std::uint64_t mode) noexcept {
    uffdio_move_arg arg{addr(dst), addr(src), len, mode, 0};
    return range_ioctl(fd_, kIoctlMove, arg, &uffdio_move_arg::move, len);
}

IoctlOutcome Uffd::poison(void* dst, std::size_t len, std::uint64_t mode) noexcept {
    uffdio_poison_arg arg{};
    arg.range = {addr(dst), len};
    arg.mode = mode;
    return range_ioctl(fd_, kIoctlPoison, arg, &uffdio_poison_arg::updated, len);
}

Result<void> Uffd::writeprotect(void* addr_, std::size_t len, bool wp, bool dontwake) noexcept {
    uffdio_writeprotect arg{};
    arg.range = {addr(addr_), len};
    arg.mode = (wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
               (dontwake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
    if (::ioctl(fd_, UFFDIO_WRITEPROTECT, &arg) != 0)
        return sys_error(range_text("UFFDIO_WRITEPROTECT", addr(addr_), len) + " mode=" +
                         mode_text(arg.mode, {"WP", "DONTWAKE"}));
    return {};
}

Result<void> Uffd::wake(void* addr_, std::size_t len) noexcept {
    uffdio_range range{addr(addr_), len};
    if (::ioctl(fd_, UFFDIO_WAKE, &range) != 0)
        return sys_error(range_text("UFFDIO_WAKE", addr(addr_), len));
    return {};
}

// One read(2) returns as many queued messages as fit (it blocks, were the fd blocking,
// only for the first). Reading a REMOVE/UNMAP/REMAP/FORK message is what lets the
// thread that caused it continue; reading a FORK message installs the child's uffd in
// this process.
Result<std::size_t> Uffd::read_events(std::span<Event> out) noexcept {
    constexpr std::size_t kChunk = 32;
    std::array<uffd_msg, kChunk> msgs;
    std::size_t n = 0;
    while (n < out.size()) {
        const std::size_t want = std::min(kChunk, out.size() - n);
        const ssize_t got = ::read(fd_, msgs.data(), want * sizeof(uffd_msg));
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || n > 0) break;  // a lasting error shows on the next call
            return sys_error("read(uffd fd=" + std::to_string(fd_) + ", " +
                             std::to_string(want * sizeof(uffd_msg)) + " bytes)");
        }
        const std::size_t count = static_cast<std::size_t>(got) / sizeof(uffd_msg);
        for (std::size_t i = 0; i < count; ++i) {
            auto ev = to_event(msgs[i]);
            if (ev) {
                out[n++] = *ev;
                continue;
            }
            // The batch is consumed either way; release the fork fds it installed.
            for (std::size_t j = 0; j < n; ++j)
                if (out[j].kind == Event::Kind::fork) ::close(std::exchange(out[j].fork_fd, -1));
            for (std::size_t j = i + 1; j < count; ++j)
                if (msgs[j].event == UFFD_EVENT_FORK) ::close(static_cast<int>(msgs[j].arg.fork.ufd));
            return std::unexpected(ev.error());
        }
        if (count < want) break;
    }
    return n;
}

}  // namespace lazymig::uffd
