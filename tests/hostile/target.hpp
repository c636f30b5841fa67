// tests/hostile/target.hpp — a real Destination under attack, and what to check afterwards.
//
// Target owns guest memory (declared first, destroyed last), a Destination listening on
// 127.0.0.1:0 and hooks that record every call. The checks read the guest mapping's
// residency (mincore, /proc/self/pagemap) and the memfd's bytes (pread) without touching
// guest memory, which would fault into the pager.
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <atomic>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

#include "lazymig/lazymig.hpp"
#include "tests/hostile/peer.hpp"

namespace hostile {

using lazymig::Backing;

struct Calls {
    std::atomic<int> load{0}, resume{0}, pause{0};
    std::atomic<std::size_t> device_bytes{0};
    std::mutex mu;
    std::vector<lazymig::Event> events;

    std::string error_event() {
        std::lock_guard lock(mu);
        for (const auto& e : events)
            if (e.kind == lazymig::Event::Kind::error) return e.message;
        return "(no error event)";
    }
};

// Runs `wait()` with a deadline; on expiry the test fails and the endpoint is cancelled.
template <class Endpoint>
lazymig::Result<void> bounded_wait(Endpoint& e, std::chrono::seconds limit = std::chrono::seconds(60)) {
    std::promise<lazymig::Result<void>> done;
    auto fut = done.get_future();
    std::thread t([&] { done.set_value(e.wait()); });
    if (fut.wait_for(limit) != std::future_status::ready) {
        FAIL_CHECK("wait() did not return within ", limit.count(), " s; cancelling");
        e.cancel();
    }
    t.join();
    return fut.get();
}

class Target {
public:
    static constexpr std::size_t kSize = 8u << 20;
    static constexpr std::size_t kPages = kSize / kPage;

    explicit Target(Backing backing) : backing_(backing), calls_(std::make_shared<Calls>()) {
        auto m = lazymig::GuestMemory::create("ram0", kSize, backing, false);
        REQUIRE_MESSAGE(m.has_value(), err_of(m));
        mem_ = std::move(*m);
        auto c = calls_;
        lazymig::VmmHooks hooks{
            .pause_vcpus = [c] { ++c->pause; },
            .resume_vcpus = [c] { ++c->resume; },
            .save_device_state = {},
            .load_device_state = [c](std::span<const std::byte> blob) -> lazymig::Result<void> {
                ++c->load;
                c->device_bytes = blob.size();
                return {};
            },
            .on_epoch_committed = {},
            .on_event = [c](const lazymig::Event& e) {
                std::lock_guard lock(c->mu);
                c->events.push_back(e);
            },
        };
        // The hostile peer speaks pre-copy and post-copy frames; it opens no replication
        // channel, so back-replication is off here (epoch_ms 0; tests/replicate covers it).
        lazymig::Parameters params;
        params.epoch_ms = 0;
        auto d = lazymig::Destination::listen(
            {.regions = {mem_.region()}, .hooks = hooks, .uri = "tcp:127.0.0.1:0", .parameters = params,
             .security = testkey::security()});
        REQUIRE_MESSAGE(d.has_value(), err_of(d));
        dst_ = std::move(*d);
        auto ep = lazymig::net::parse_uri(dst_->local_uri());
        REQUIRE_MESSAGE(ep.has_value(), err_of(ep));
        port_ = ep->port;
    }

    [[nodiscard]] std::uint16_t port() const { return port_; }
    [[nodiscard]] Calls& calls() { return *calls_; }
    [[nodiscard]] lazymig::Destination& dst() { return *dst_; }
    [[nodiscard]] const lazymig::GuestMemory& mem() const { return mem_; }
    [[nodiscard]] std::byte* page(std::size_t i) const { return mem_.data() + i * kPage; }

    // The Destination must fail; returns the full text of its error.
    std::string failure() {
        auto r = bounded_wait(*dst_);
        REQUIRE_MESSAGE(!r.has_value(), "the destination accepted what it should have refused");
        const auto s = dst_->stats();
        CHECK(s.phase == lazymig::Phase::failed);
        CHECK(s.error == r.error().message());
        return r.error().message();
    }

    // Nothing reached guest memory: no page counted present, none mapped or resident,
    // and for a memfd every byte of the file is still zero.
    void check_nothing_placed() {
        CHECK(dst_->stats().pages_present == 0);
        CHECK(mapped_pages() == 0);
        if (backing_ == Backing::memfd) CHECK(file_nonzero_bytes(0, kPages) == 0);
    }

    // Pages of the guest mapping with a page-table entry (pagemap) or, for anonymous
    // memory, resident (mincore).
    [[nodiscard]] std::size_t mapped_pages() const {
        std::vector<unsigned char> vec(kPages);
        REQUIRE(::mincore(mem_.data(), kSize, vec.data()) == 0);
        std::size_t n = 0;
        if (backing_ == Backing::anon)
            for (auto v : vec) n += v & 1;
        // For a file mapping mincore reports the page cache (all of it: the pager
        // fallocated the file), so ask the page tables instead.
        const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        std::vector<std::uint64_t> pm(kPages);
        const auto off = static_cast<off_t>(reinterpret_cast<std::uintptr_t>(mem_.data()) / kPage * 8);
        REQUIRE(::pread(fd, pm.data(), pm.size() * 8, off) == static_cast<ssize_t>(pm.size() * 8));
        ::close(fd);
        std::size_t mapped = 0;  // bit 63: present (62, "swapped", is also set by poison markers)
        for (auto e : pm) mapped += e >> 63 & 1;
        return std::max(n, mapped);
    }
    [[nodiscard]] bool page_mapped(std::size_t i) const {
        unsigned char v = 0;
        REQUIRE(::mincore(page(i), kPage, &v) == 0);
        if (backing_ == Backing::anon) return v & 1;
        const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        std::uint64_t e = 0;
        REQUIRE(::pread(fd, &e, 8, static_cast<off_t>(reinterpret_cast<std::uintptr_t>(page(i)) / kPage * 8)) == 8);
        ::close(fd);
        return e >> 63 & 1;
    }
    // Non-zero bytes in pages [first, first+count) of the memfd, read with pread.
    [[nodiscard]] std::size_t file_nonzero_bytes(std::size_t first, std::size_t count) const {
        REQUIRE(backing_ == Backing::memfd);
        std::vector<unsigned char> buf(kPage);
        std::size_t n = 0;
        for (std::size_t p = first; p < first + count; ++p) {
            REQUIRE(::pread(mem_.region().fd, buf.data(), kPage, static_cast<off_t>(p * kPage)) ==
                    static_cast<ssize_t>(kPage));
            for (auto c : buf) n += c != 0;
        }
        return n;
    }

private:
    Backing backing_;
    std::shared_ptr<Calls> calls_;
    lazymig::GuestMemory mem_;
    std::unique_ptr<lazymig::Destination> dst_;
    std::uint16_t port_ = 0;
};

// A source that has done everything right so far: both HELLOs, optionally the region
// table and the device state.
struct HostileSource {
    Conn urgent, bulk;

    explicit HostileSource(std::uint16_t port, std::uint64_t session = 0x5eed,
                           lazymig::Mode mode = lazymig::Mode::postcopy) {
        urgent = Conn::to(port);
        urgent.send(proto::encode(proto::Hello{.channel = proto::Channel::urgent, .mode = mode, .session = session}));
        urgent.expect(proto::Type::hello_ack);
        bulk = Conn::to(port);
        bulk.send(proto::encode(proto::Hello{.channel = proto::Channel::bulk, .mode = mode, .session = session}));
        bulk.expect(proto::Type::hello_ack);
    }
    void region_table(std::uint64_t size = Target::kSize) {
        proto::RegionTable t;
        t.regions.push_back({"ram0", size, kPage, Backing::anon});
        urgent.send(proto::encode(t));
        urgent.expect(proto::Type::region_ack);
    }
    void device_state(std::size_t bytes = 1000) {
        urgent.send(proto::encode(proto::DeviceState{std::vector<std::byte>(bytes, std::byte{7})}));
        urgent.expect(proto::Type::device_loaded);
        urgent.send(proto::encode_empty(proto::Type::go));
        urgent.expect(proto::Type::resumed);
    }
};

enum class Touch { sigbus, read_zero, read_data, hung, other };
inline const char* to_string(Touch t) {
    switch (t) {
    case Touch::sigbus: return "SIGBUS";
    case Touch::read_zero: return "read zeroes";
    case Touch::read_data: return "read data";
    case Touch::hung: return "hung";
    case Touch::other: return "other";
    }
    return "?";
}

namespace detail {
inline const void* g_touch_addr = nullptr;
inline void on_sigbus(int, siginfo_t* si, void*) { ::_exit(si->si_addr == g_touch_addr ? 42 : 43); }
inline int touch_child(void* addr) {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    ::sigaction(SIGBUS, &sa, nullptr);
    const unsigned char v = *static_cast<volatile const unsigned char*>(addr);
    ::_exit(v == 0 ? 10 : 11);
}
}  // namespace detail

// Reads one byte at `addr` from a child process that shares this address space
// (clone(CLONE_VM)), so it sees the guest mapping exactly as a vCPU thread of the VMM
// would: registered with the userfaultfd, poison markers and all. (A plain fork() would
// not do for memfd: it copies no page tables of a shared file mapping, and the child
// would read the file's zeroes.) The child catches SIGBUS in its own signal table and
// exits with a code that says whether the fault was at `addr`.
inline Touch touch_in_child(const void* addr) {
    constexpr std::size_t kStack = 256 * 1024;
    void* stack = ::mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    REQUIRE(stack != MAP_FAILED);
    detail::g_touch_addr = addr;
    const pid_t pid = ::clone(detail::touch_child, static_cast<char*>(stack) + kStack, CLONE_VM | SIGCHLD,
                              const_cast<void*>(addr));
    REQUIRE(pid > 0);
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    REQUIRE(pidfd >= 0);
    pollfd p{pidfd, POLLIN, 0};
    const bool ended = ::poll(&p, 1, kTimeoutMs) == 1;
    if (!ended) ::kill(pid, SIGKILL);  // blocked on a page that will never arrive
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    ::close(pidfd);
    ::munmap(stack, kStack);
    if (!ended) return Touch::hung;
    if (!WIFEXITED(status)) return Touch::other;
    switch (WEXITSTATUS(status)) {
    case 42: return Touch::sigbus;
    case 10: return Touch::read_zero;
    case 11: return Touch::read_data;
    default: return Touch::other;
    }
}

}  // namespace hostile
