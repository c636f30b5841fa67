// lazymig-uffd-handler against a program that plays Firecracker's side of the handshake
// (fc_vmm.hpp): faults served from a snapshot file and from a remote lazymig Source,
// a balloon's MADV_DONTNEED, malformed handshakes, the VMM exiting mid-session.
// Interleavings come from the fail point source_push_batch (the background fill held
// until the test writes to a FIFO), never from timing.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <random>
#include <thread>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "fc_vmm.hpp"
#include "harness.hpp"

namespace {

using namespace vmm::test;

constexpr std::size_t kMiB = 1 << 20;

std::string binary(const char* env) {
    const char* p = std::getenv(env);
    REQUIRE_MESSAGE(p, env << " is not set (meson sets it)");
    return p;
}

struct Handler {
    std::unique_ptr<Process> proc;
    std::string socket, mgmt, log;

    static Handler start(const TempDir& dir, std::vector<std::string> args, std::vector<std::string> env = {}) {
        Handler h{nullptr, dir.file("fc.sock"), dir.file("mgmt.sock"), dir.file("handler.log")};
        std::vector<std::string> argv{binary("LAZYMIG_UFFD_HANDLER"), "--socket", h.socket, "--mgmt", h.mgmt};
        argv.insert(argv.end(), args.begin(), args.end());
        h.proc = Process::spawn(argv, h.log, env);
        auto line = h.proc->read_line(30s);
        REQUIRE_MESSAGE(line, "the handler did not start: " << tail(h.log));
        REQUIRE(line->find("listening on") != std::string::npos);
        return h;
    }
    // The next stdout line that contains `what` (a session's serving or summary line).
    std::string expect(const std::string& what) {
        for (;;) {
            auto line = proc->read_line(120s);
            REQUIRE_MESSAGE(line, "no line with '" << what << "'; log: " << tail(log));
            if (line->find(what) != std::string::npos) return *line;
        }
    }
    json query() {
        auto c = vmm::QmpClient::connect(mgmt);
        REQUIRE_MESSAGE(c, why(c));
        auto r = c->execute("query-uffd-handler");
        REQUIRE_MESSAGE(r, why(r));
        return *r;
    }
};

std::string make_snapshot(const TempDir& dir, std::uint64_t bytes) {
    const std::string path = dir.file("mem.snap");
    auto w = fc::write_snapshot(path, bytes);
    REQUIRE_MESSAGE(w, why(w));
    return path;
}

// `threads` threads each touch `per_thread` random pages of every region and check every byte.
void touch_and_check(const fc::Vmm& vm, int threads, int per_thread) {
    std::atomic<int> bad{0};
    std::string first_bad;
    std::mutex mu;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            std::mt19937_64 rng(t + 1);
            for (int i = 0; i < per_thread; ++i)
                for (const auto& r : vm.regions()) {
                    const auto page = rng() % (r.size / 4096);
                    if (auto e = fc::check_page(r, page); !e.empty() && bad++ == 0) {
                        std::lock_guard l(mu);
                        first_bad = e;
                    }
                }
        });
    for (auto& t : ts) t.join();
    CHECK_MESSAGE(bad.load() == 0, first_bad);
}

void check_all(const fc::Vmm& vm) {
    std::size_t bad = 0;
    std::string first;
    for (const auto& r : vm.regions())
        for (std::uint64_t p = 0; p < r.size / 4096; ++p)
            if (auto e = fc::check_page(r, p); !e.empty() && bad++ == 0) first = e;
    CHECK_MESSAGE(bad == 0, bad << " pages differ; first: " << first);
}

std::string make_fifo(const TempDir& dir) {
    const std::string path = dir.file("fill.fifo");
    REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
    return path;
}

void release(const std::string& fifo) {
    const int fd = ::open(fifo.c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, "x", 1) == 1);
    ::close(fd);
}

}  // namespace

TEST_CASE("uffd-handler/snapshot") {
    TempDir dir;
    const auto snap = make_snapshot(dir, 48 * kMiB);
    const std::string fifo = make_fifo(dir);
    auto h = Handler::start(dir, {"--snapshot", snap}, {"LAZYMIG_FAILPOINTS=source_push_batch=hold:" + fifo});
    auto vm = fc::Vmm::create({32 * kMiB, 16 * kMiB});
    REQUIRE_MESSAGE(vm, why(vm));
    REQUIRE(vm->handshake(h.socket));
    h.expect("serving on");
    // The fill is held: every page read now arrives through a fault.
    touch_and_check(*vm, 4, 200);
    const json mid = h.query();
    CHECK(mid["current"]["stats"]["faults"].get<std::uint64_t>() > 0);
    CHECK(mid["current"]["stats"]["pages_pushed"] == 0);
    CHECK(mid["current"]["stats"]["pages_present"].get<std::uint64_t>() < 12288);
    release(fifo);
    const std::string done = h.expect("(pid ");
    CHECK_MESSAGE(done.find("completed") != std::string::npos, done);
    CHECK_MESSAGE(done.find("pages present 12288/12288") != std::string::npos, done);
    check_all(*vm);  // every page, resident without a fault after the fill
    const json q = h.query();
    CHECK(q["sessions"] == 1);
    CHECK(q["last"]["outcome"] == "completed");
    CHECK(q["last"]["stats"]["pages_pushed"].get<std::uint64_t>() > 0);
}

TEST_CASE("uffd-handler/remote") {
    TempDir dir;
    const auto snap = make_snapshot(dir, 24 * kMiB);
    // The remote Source proves the migration's key; the handler refuses anyone else.
    auto h = Handler::start(dir, {"--listen", "tcp:127.0.0.1:0", "--tls-psk-file", dir.key_file()});
    auto vm = fc::Vmm::create({16 * kMiB, 8 * kMiB});
    REQUIRE_MESSAGE(vm, why(vm));
    REQUIRE(vm->handshake(h.socket));
    const std::string serving = h.expect("serving on ");
    const std::string uri = serving.substr(serving.find("serving on ") + 11);
    std::vector<std::string> argv{binary("LAZYMIG_SNAPSHOT_SOURCE"), snap, uri};
    for (const auto& r : vm->regions()) argv.push_back(fmt::format("{}:{}", r.size, r.offset));
    auto src = Process::spawn(argv, dir.file("source.log"), {"LAZYMIG_PSK_FILE=" + dir.key_file()});
    touch_and_check(*vm, 3, 150);
    const std::string done = h.expect("(pid ");
    CHECK_MESSAGE(done.find("completed") != std::string::npos, done);
    CHECK(src->wait(60s) == 0);
    check_all(*vm);
}

TEST_CASE("uffd-handler/balloon") {
    TempDir dir;
    const auto snap = make_snapshot(dir, 16 * kMiB);
    const std::string fifo = make_fifo(dir);
    auto h = Handler::start(dir, {"--snapshot", snap}, {"LAZYMIG_FAILPOINTS=source_push_batch=hold:" + fifo});
    auto vm = fc::Vmm::create({16 * kMiB});
    REQUIRE_MESSAGE(vm, why(vm));
    REQUIRE(vm->handshake(h.socket));
    h.expect("serving on");
    const fc::Region& r = vm->regions()[0];
    // Pages 1024..1535 (2 MiB): the first half touched (present), the second never.
    for (std::uint64_t p = 1024; p < 1280; ++p) REQUIRE(fc::check_page(r, p).empty());
    // The balloon takes them: madvise returns once the handler has read the REMOVE.
    REQUIRE(::madvise(r.host + 1024 * 4096, 512 * 4096, MADV_DONTNEED) == 0);
    for (std::uint64_t p = 1024; p < 1536; p += 2) CHECK_MESSAGE(fc::check_page(r, p, true).empty(), fc::check_page(r, p, true));
    // The fill now pushes the snapshot's bytes for the rest of the range: zero it stays.
    release(fifo);
    const std::string done = h.expect("(pid ");
    // Discarded pages need nothing from the snapshot: the session completes without
    // waiting for a fault on each (afterwards the kernel zero-fills them).
    CHECK_MESSAGE(done.find("completed: pages present 4096/4096, removed 512") != std::string::npos, done);
    for (std::uint64_t p = 1024; p < 1536; ++p) CHECK_MESSAGE(fc::check_page(r, p, true).empty(), fc::check_page(r, p, true));
    for (std::uint64_t p = 0; p < r.size / 4096; ++p)
        if (p < 1024 || p >= 1536) REQUIRE_MESSAGE(fc::check_page(r, p).empty(), fc::check_page(r, p));
}

TEST_CASE("uffd-handler/malformed") {
    TempDir dir;
    const auto snap = make_snapshot(dir, 8 * kMiB);
    auto h = Handler::start(dir, {"--snapshot", snap, "--handshake-timeout-ms", "10000"});
    auto vm = fc::Vmm::create({4 * kMiB, 4 * kMiB});
    REQUIRE_MESSAGE(vm, why(vm));
    const std::string good = vm->mappings_json();
    const auto& r0 = vm->regions()[0];
    auto refused = [&](const std::string& text, std::vector<int> fds, const std::string& want) {
        auto s = vm->send(h.socket, text, fds);
        REQUIRE_MESSAGE(s, why(s));
        const std::string line = h.expect("(pid ");
        CHECK_MESSAGE(line.find("refused") != std::string::npos, line);
        CHECK_MESSAGE(line.find(want) != std::string::npos, line << "\n  wanted: " << want);
        vm->hang_up();
    };
    SUBCASE("no fd") { refused(good, {}, "no userfaultfd came with the mappings"); }
    SUBCASE("two fds") { refused(good, {vm->uffd(), vm->uffd()}, "2 file descriptors came with the mappings"); }
    SUBCASE("bad json") { refused(R"([{"base_host_virt_addr":1,"size":}])", {vm->uffd()}, "not valid JSON"); }
    SUBCASE("not an array") { refused(R"({"size":4096})", {vm->uffd()}, "not a JSON array"); }
    SUBCASE("overlap") {
        const auto base = reinterpret_cast<std::uint64_t>(r0.host);
        refused(fmt::format(R"([{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size":4096,"page_size_kib":4096}},)"
                            R"({{"base_host_virt_addr":{},"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}}])",
                            base, r0.size, base + r0.size - 4096),
                {vm->uffd()}, fmt::format("mapping 1 [{:#x}, {:#x}) overlaps mapping 0", base + r0.size - 4096, base + r0.size + 4096));
    }
    SUBCASE("unaligned") {
        refused(fmt::format(R"([{{"base_host_virt_addr":{},"size":4095,"offset":0,"page_size":4096}}])",
                            reinterpret_cast<std::uint64_t>(r0.host)),
                {vm->uffd()}, "not aligned to its page size 4096");
    }
    SUBCASE("not registered") {
        // Memory the VMM mapped but never registered with its userfaultfd.
        void* other = ::mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(other != MAP_FAILED);
        refused(fmt::format(R"([{{"base_host_virt_addr":{},"size":1048576,"offset":0,"page_size":4096,"page_size_kib":4096}}])",
                            reinterpret_cast<std::uint64_t>(other)),
                {vm->uffd()}, fmt::format("mapping 0 [{:#x}, {:#x}): bytes from {:#x} are not registered",
                                          reinterpret_cast<std::uint64_t>(other), reinterpret_cast<std::uint64_t>(other) + (1 << 20),
                                          reinterpret_cast<std::uint64_t>(other)));
        ::munmap(other, 1 << 20);
    }
    SUBCASE("beyond the snapshot") {
        refused(fmt::format(R"([{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":4096,"page_size_kib":4096}}])",
                            reinterpret_cast<std::uint64_t>(r0.host), r0.size, 6 * kMiB),
                {vm->uffd()}, "needs bytes [6291456, 10485760) of the snapshot file, which has 8388608");
    }
    SUBCASE("page_size_kib differs") {
        refused(fmt::format(R"([{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size":4096,"page_size_kib":4}}])",
                            reinterpret_cast<std::uint64_t>(r0.host), r0.size),
                {vm->uffd()}, "page_size 4096 and page_size_kib 4 differ");
    }
    // The handler is still serving: the real handshake on the next connection works.
    auto vm2 = fc::Vmm::create({4 * kMiB, 4 * kMiB});
    REQUIRE_MESSAGE(vm2, why(vm2));
    REQUIRE(vm2->handshake(h.socket));
    touch_and_check(*vm2, 2, 100);
    const std::string done = h.expect("(pid ");
    CHECK_MESSAGE(done.find("completed") != std::string::npos, done);
    check_all(*vm2);
    CHECK(h.query()["refused"] == 1);
}

TEST_CASE("uffd-handler/vmm-exit") {
    TempDir dir;
    const auto snap = make_snapshot(dir, 8 * kMiB);
    const std::string fifo = make_fifo(dir);
    auto h = Handler::start(dir, {"--snapshot", snap}, {"LAZYMIG_FAILPOINTS=source_push_batch=hold:" + fifo});
    // A child plays the VMM: handshake, a few faults served, then it exits mid-session.
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        auto vm = fc::Vmm::create({8 * kMiB});
        if (!vm || !vm->handshake(h.socket)) ::_exit(3);
        for (std::uint64_t p = 0; p < 64; ++p)
            if (!fc::check_page(vm->regions()[0], p * 17).empty()) ::_exit(4);
        ::_exit(0);
    }
    ::close(ready[0]);
    ::close(ready[1]);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) == 0);
    // The VMM is gone before the fill may run: the handler saw its hangup (the connection
    // closed when the child exited); releasing the held fill lets the session's source stop.
    release(fifo);
    const std::string ended = h.expect("(pid ");
    CHECK_MESSAGE(ended.find("vmm-exited: the VMM closed its connection") != std::string::npos, ended);
    CHECK_MESSAGE(ended.find("pages present 2048/2048") == std::string::npos, ended);
    auto vm = fc::Vmm::create({8 * kMiB});
    REQUIRE_MESSAGE(vm, why(vm));
    REQUIRE(vm->handshake(h.socket));
    const std::string done = h.expect("(pid ");
    CHECK_MESSAGE(done.find("completed") != std::string::npos, done);
    check_all(*vm);
    CHECK(h.query()["sessions"] == 2);
}
