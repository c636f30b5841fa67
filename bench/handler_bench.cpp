// lazymig-handler-bench (scripts/bench --handler): restoring a snapshot through a
// userfaultfd handler process, Firecracker style (tests/uffd-handler/fc_vmm.hpp plays
// the VMM). The guest workload first makes N random page touches, then sweeps every
// page once (a VM that eventually uses all its memory). Printed side by side for
//   plain    a one-page-per-fault handler written here, as Firecracker's example
//            on-demand handler does it: the snapshot mmapped, UFFDIO_COPY of one page
//            per fault from that mapping, nothing else;
//   lazymig  lazymig-uffd-handler --snapshot: faults with a trend-grown prefetch
//            window, and the background fill in 1 MiB preads.
// Figures: time to the first N touches, time until every page is resident (the
// sweep done), faults taken by the workload's threads. Memory is checked byte for
// byte after each run; a wrong byte makes the exit code 1.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "fc_vmm.hpp"

namespace {

using Clock = std::chrono::steady_clock;
extern "C" char** environ;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// The baseline: accept one VMM, take its uffd, serve each fault with one UFFDIO_COPY of
// one page from the mmapped snapshot, until the VMM hangs up.
int plain_handler(const char* sock_path, const char* snap_path) {
    const int snap = ::open(snap_path, O_RDONLY | O_CLOEXEC);
    struct stat st{};
    if (snap < 0 || ::fstat(snap, &st) != 0) return std::perror(snap_path), 1;
    auto* mem = static_cast<const std::byte*>(::mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, snap, 0));
    if (mem == MAP_FAILED) return std::perror("mmap snapshot"), 1;
    const int ls = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", sock_path);
    ::unlink(sock_path);
    if (::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(ls, 1) != 0) return std::perror("bind"), 1;
    std::printf("listening\n");
    std::fflush(stdout);
    const int conn = ::accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
    char buf[64 * 1024];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    iovec iov{buf, sizeof buf};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t got = ::recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (got <= 0 || !c || c->cmsg_type != SCM_RIGHTS) return std::fprintf(stderr, "plain: no uffd\n"), 1;
    int uffd;
    std::memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
    // One mapping per region: "base_host_virt_addr":B,"size":S,"offset":O.
    struct M { std::uint64_t base, size, offset; };
    std::vector<M> maps;
    std::string text(buf, static_cast<std::size_t>(got));
    for (std::size_t at = 0; (at = text.find("\"base_host_virt_addr\":", at)) != std::string::npos; ++at) {
        M m{};
        std::sscanf(text.c_str() + at, "\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":%lu", &m.base, &m.size, &m.offset);
        maps.push_back(m);
    }
    std::vector<uffd_msg> msgs(64);
    for (;;) {
        pollfd fds[2] = {{uffd, POLLIN, 0}, {conn, POLLRDHUP, 0}};
        if (::poll(fds, 2, -1) < 0) continue;
        if (fds[1].revents) return 0;
        const ssize_t n = ::read(uffd, msgs.data(), msgs.size() * sizeof(uffd_msg));
        for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
            const std::uint64_t addr = msgs[i].arg.pagefault.address & ~4095ull;
            for (const auto& m : maps)
                if (addr >= m.base && addr < m.base + m.size) {
                    uffdio_copy cp{.dst = addr, .src = reinterpret_cast<std::uint64_t>(mem + m.offset + (addr - m.base)),
                                   .len = 4096, .mode = 0, .copy = 0};
                    (void)::ioctl(uffd, UFFDIO_COPY, &cp);  // EEXIST: another thread's fault placed it
                }
        }
    }
}

struct Run {
    double first_n_ms = 0, resident_ms = 0;
    std::uint64_t bad_pages = 0;
    std::string summary;
};

pid_t spawn(const std::vector<std::string>& args, int out_fd) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out_fd, STDOUT_FILENO);
    pid_t pid = -1;
    if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&fa);
    return pid;
}

// Lines of the handler's stdout, bounded waits.
std::string read_line(int fd, std::string& buf, int timeout_ms) {
    for (;;) {
        if (auto nl = buf.find('\n'); nl != std::string::npos) {
            std::string line = buf.substr(0, nl);
            buf.erase(0, nl + 1);
            return line;
        }
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, timeout_ms) <= 0) return {};
        char tmp[4096];
        const ssize_t n = ::read(fd, tmp, sizeof tmp);
        if (n <= 0) return {};
        buf.append(tmp, static_cast<std::size_t>(n));
    }
}

Run run(const std::vector<std::string>& handler, const std::string& sock, std::size_t bytes, std::uint64_t touches,
        unsigned threads) {
    Run out;
    int pipefd[2];
    if (::pipe2(pipefd, O_CLOEXEC) != 0) return out;
    const pid_t pid = spawn(handler, pipefd[1]);
    ::close(pipefd[1]);
    std::string buf;
    if (pid < 0 || read_line(pipefd[0], buf, 30000).find("listening") == std::string::npos) {
        std::fprintf(stderr, "handler did not start\n");
        std::exit(1);
    }
    auto vm = fc::Vmm::create({bytes});
    if (!vm || !vm->handshake(sock)) {
        std::fprintf(stderr, "handshake failed\n");
        std::exit(1);
    }
    const fc::Region& r = vm->regions()[0];
    const std::uint64_t pages = bytes / 4096;
    const auto t0 = Clock::now();
    std::atomic<std::uint64_t> done{0};
    std::atomic<bool> first_n_seen{false};
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            std::mt19937_64 rng(t + 7);
            volatile std::uint64_t sink = 0;
            for (std::uint64_t i = 0; i < touches / threads; ++i) {
                sink = sink + *reinterpret_cast<const std::uint64_t*>(r.host + rng() % pages * 4096);
                if (done.fetch_add(1) + 1 == touches / threads * threads && !first_n_seen.exchange(true))
                    out.first_n_ms = ms_since(t0);
            }
            // Then the sweep: each thread its share of the pages.
            for (std::uint64_t p = t; p < pages; p += threads) sink = sink + *reinterpret_cast<const std::uint64_t*>(r.host + p * 4096);
        });
    for (auto& t : ts) t.join();
    out.resident_ms = ms_since(t0);
    for (std::uint64_t p = 0; p < pages; ++p) out.bad_pages += !fc::check_page(r, p).empty();
    vm->hang_up();
    vm = lazymig::Result<fc::Vmm>(std::unexpected(lazymig::Error{0, "done"}));  // the VMM exits: memory and uffd closed
    // The plain handler exits at the hangup (EOF); lazymig's prints its session summary.
    for (std::string line; !(line = read_line(pipefd[0], buf, 60000)).empty();)
        if (line.find("(pid ") != std::string::npos) {
            out.summary = line;
            break;
        }
    ::kill(pid, SIGTERM);
    ::waitpid(pid, nullptr, 0);
    ::close(pipefd[0]);
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 4 && std::string(argv[1]) == "--plain-handler") return plain_handler(argv[2], argv[3]);
    std::size_t mib = 1024;
    std::uint64_t touches = 20000;
    unsigned threads = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string k = argv[i];
        if (k == "--size-mib") mib = std::stoul(argv[i + 1]);
        else if (k == "--touches") touches = std::stoull(argv[i + 1]);
        else if (k == "--threads") threads = static_cast<unsigned>(std::stoul(argv[i + 1]));
        else return std::fprintf(stderr, "usage: %s [--size-mib N] [--touches N] [--threads N]\n", argv[0]), 2;
    }
    char dir_tmpl[] = "/tmp/lazymig-handler-bench-XXXXXX";
    const std::string dir = ::mkdtemp(dir_tmpl);
    const std::string snap = dir + "/mem.snap", sock = dir + "/fc.sock";
    const std::size_t bytes = mib << 20;
    if (auto w = fc::write_snapshot(snap, bytes); !w) return std::fprintf(stderr, "%s\n", w.error().message().c_str()), 1;
    std::printf("handler benchmark: %zu MiB snapshot, %lu random touches by %u threads, then a sweep of every page\n", mib,
                touches, threads);
    const Run plain = run({argv[0], "--plain-handler", sock, snap}, sock, bytes, touches, threads);
    const Run lazy = run({BENCH_UFFD_HANDLER, "--socket", sock, "--snapshot", snap}, sock, bytes, touches, threads);
    std::printf("%-28s %12s %12s\n", "", "plain", "lazymig");
    std::printf("%-28s %12.1f %12.1f\n", fmt::format("first {} touches (ms)", touches).c_str(), plain.first_n_ms, lazy.first_n_ms);
    std::printf("%-28s %12.1f %12.1f\n", "fully resident (ms)", plain.resident_ms, lazy.resident_ms);
    std::printf("%-28s %12lu %12lu\n", "wrong pages", plain.bad_pages, lazy.bad_pages);
    std::printf("lazymig handler: %s\n", lazy.summary.c_str());
    std::printf("{\"size_mib\": %zu, \"touches\": %lu, \"plain_first_n_ms\": %.1f, \"lazymig_first_n_ms\": %.1f, "
                "\"plain_resident_ms\": %.1f, \"lazymig_resident_ms\": %.1f}\n",
                mib, touches, plain.first_n_ms, lazy.first_n_ms, plain.resident_ms, lazy.resident_ms);
    ::unlink(snap.c_str());
    ::rmdir(dir.c_str());
    return plain.bad_pages || lazy.bad_pages ? 1 : 0;
}
