// bench/vm_process.hpp — lazymig-vmm processes for the benchmarks that drive real VMs
// (busy_guest.cpp, modes.cpp). Only built when lazymig-vmm is (BENCH_VMM).
#pragma once

#ifdef BENCH_VMM
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/common.hpp"
#include "qmp_client.hpp"

extern char** environ;

namespace bench {

using json = nlohmann::json;
using namespace std::chrono_literals;

// A lazymig-vmm process: stdout on a pipe (its "ready" line), stderr to a log file.
// Killed (SIGKILL) and reaped if still running when destroyed.
class Vm {
public:
    static std::unique_ptr<Vm> start(const std::string& dir, const std::string& name, std::vector<std::string> args,
                                      std::string* error) {
        auto vm = std::unique_ptr<Vm>(new Vm);
        vm->qmp = dir + "/" + name + ".sock";
        vm->log = dir + "/" + name + ".log";
        // Without TLS, like the other default rows (scripts/bench --tls compares it).
        std::vector<std::string> argv{BENCH_VMM, "run", "--qmp", vm->qmp, "--auth", "none"};
        argv.insert(argv.end(), args.begin(), args.end());
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return *error = "pipe failed", nullptr;
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, p[1], STDOUT_FILENO);
        posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, vm->log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        std::vector<char*> cargv;
        for (auto& a : argv) cargv.push_back(a.data());
        cargv.push_back(nullptr);
        const int rc = ::posix_spawn(&vm->pid_, cargv[0], &fa, nullptr, cargv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        ::close(p[1]);
        vm->out_ = p[0];
        if (rc != 0) return *error = fmt::format("posix_spawn {}: errno {}", argv[0], rc), nullptr;
        // Booting writes every page of guest RAM: minutes at worst on a loaded machine.
        const auto deadline = std::chrono::steady_clock::now() + 600s;
        std::string buf;
        for (;;) {
            if (buf.find("ready\n") != std::string::npos) break;
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            pollfd pfd{vm->out_, POLLIN, 0};
            if (left.count() <= 0 || ::poll(&pfd, 1, static_cast<int>(left.count())) <= 0)
                return *error = name + ": no 'ready' within 600 s", nullptr;
            char chunk[512];
            const ssize_t n = ::read(vm->out_, chunk, sizeof chunk);
            if (n <= 0) return *error = name + ": exited before 'ready' (see " + vm->log + ")", nullptr;
            buf.append(chunk, static_cast<std::size_t>(n));
        }
        if (auto at = buf.find("incoming: "); at != std::string::npos)
            vm->incoming = buf.substr(at + 10, buf.find('\n', at) - at - 10);
        return vm;
    }
    ~Vm() {
        if (pid_ > 0 && !reaped_) {
            ::kill(pid_, SIGKILL);
            int st;
            ::waitpid(pid_, &st, 0);
        }
        if (out_ >= 0) ::close(out_);
    }
    // After quit: the exit code, or -1 if it did not exit within 60 s (then killed).
    int wait_exit() {
        for (int i = 0; i < 6000; ++i) {
            int st = 0;
            if (::waitpid(pid_, &st, WNOHANG) == pid_) {
                reaped_ = true;
                return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            }
            pollfd none{-1, 0, 0};
            ::poll(&none, 0, 10);  // bounded wait for a process to exit: no event to wait on
        }
        return -1;
    }
    std::string qmp, log, incoming;

private:
    Vm() = default;
    pid_t pid_ = -1;
    int out_ = -1;
    bool reaped_ = false;
};

inline double num(const json& j, std::initializer_list<const char*> path) {
    const json* p = &j;
    for (const char* k : path) {
        if (!p->is_object() || !p->contains(k)) return 0;
        p = &(*p)[k];
    }
    return p->is_number() ? p->get<double>() : 0;
}

inline double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Runs `body(dir)` in a fresh directory under /tmp, removed afterwards with all it holds
// (the VMs' sockets and logs).
template <class Body>
Fields in_scratch_dir(const std::string& what, Body body) {
    char tmpl[] = "/tmp/lazymig-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return Fields().set_str("error", what + ": mkdtemp failed");
    Fields f = body(std::string(tmpl));
    std::error_code ec;
    std::filesystem::remove_all(tmpl, ec);
    return f;
}

// A migration's two VMs, started with the same `common` arguments: the destination
// listening on loopback, then the source; a QMP client on each (capabilities negotiated,
// so both receive events). Null with *error prefixed by `what` if any step failed.
struct VmPair {
    std::unique_ptr<Vm> src, dst;
    std::optional<vmm::QmpClient> sc, dc;
};
inline std::unique_ptr<VmPair> start_pair(const std::string& dir, const std::vector<std::string>& common,
                                          const std::string& what, std::string* error) {
    auto pair = std::make_unique<VmPair>();
    auto dst_args = common;
    dst_args.insert(dst_args.end(), {"--incoming", "tcp:127.0.0.1:0"});
    std::string err;
    pair->dst = Vm::start(dir, "dst", dst_args, &err);
    if (pair->dst) pair->src = Vm::start(dir, "src", common, &err);
    if (!pair->dst || !pair->src) return *error = what + ": " + err, nullptr;
    auto sc = vmm::QmpClient::connect(pair->src->qmp);
    auto dc = vmm::QmpClient::connect(pair->dst->qmp);
    if (!sc || !dc) return *error = what + ": cannot connect to the management sockets", nullptr;
    pair->sc.emplace(std::move(*sc));
    pair->dc.emplace(std::move(*dc));
    return pair;
}

// The guest's operations so far (workload-status), or nothing if the VM did not answer.
inline std::optional<double> guest_ops(vmm::QmpClient& c) {
    auto r = c.execute("query-status");
    if (!r) return std::nullopt;
    return num(*r, {"workload-status", "operations"});
}

// The guest's operations per second over one second of the running VM.
inline std::optional<double> guest_rate(vmm::QmpClient& c) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto ops0 = guest_ops(c);
    pollfd none{-1, 0, 0};
    ::poll(&none, 0, 1000);  // the measuring window, not a synchronisation
    const auto ops1 = guest_ops(c);
    if (!ops0 || !ops1) return std::nullopt;
    return (*ops1 - *ops0) / seconds_since(t0);
}

}  // namespace bench
#endif
