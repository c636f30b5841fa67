// The busy-guest run: real lazymig-vmm processes, one migration, progress measured
// through query-status before and during post-copy.
#include "bench/busy_guest.hpp"

#include <fmt/format.h>

namespace bench {

bool report_busy_guest(Report& rep, std::size_t bytes) {
    rep.line(fmt::format("\nbusy guest: lazymig-vmm, {} MiB memfd, 1 vCPU running `pattern` unpaced (--rate 0), "
                         "post-copy at once",
                         bytes >> 20));
    const Fields f = run_in_child([&] { return busy_guest_run(bytes); });
    Json& j = rep.json;
    if (f.has("skipped")) {
        rep.line("  skipped: " + f.str("skipped"));
        j.num("blocktime_ms", 0);
        return true;
    }
    if (f.has("error")) rep.line("  ERROR: " + f.str("error"));
    if (!f.has("busy_total_ms")) return false;
    const double before = f.num("busy_rate_before"), during = f.num("busy_rate_during");
    rep.line(fmt::format("  total {:.0f} ms (post-copy {:.0f} ms, downtime {:.2f} ms); faults {}, pages demanded {}, "
                         "pushed {}; fault p50 {:.1f} us p99 {:.1f} us",
                         f.num("busy_total_ms"), f.num("busy_postcopy_ms"), f.num("busy_downtime_ms"),
                         f.num("busy_faults"), f.num("busy_pages_demanded"), f.num("busy_pages_pushed"),
                         f.num("busy_fault_p50_us"), f.num("busy_fault_p99_us")));
    rep.line(fmt::format("  blocktime {:.1f} ms{}", f.num("busy_blocktime_ms"),
                         f.num("busy_blocktime_reported") ? "" : " (not reported by this lazymig-vmm)"));
    rep.line(fmt::format("  guest progress: {:.2f} M pages/s during post-copy vs {:.2f} M pages/s before = {:.0f}%",
                         during / 1e6, before / 1e6, before > 0 ? 100 * during / before : 0.0));
    rep.line(fmt::format("  (boot of both VMs {:.1f} s; check-workload {})", f.num("busy_boot_s"),
                         f.num("busy_check_ok") ? "ok" : "FAILED"));
    for (const char* k : {"busy_total_ms", "busy_postcopy_ms", "busy_downtime_ms", "busy_faults", "busy_pages_demanded",
                          "busy_pages_pushed", "busy_blocktime_ms", "busy_fault_p50_us", "busy_fault_p99_us",
                          "busy_rate_before", "busy_rate_during"})
        j.num(k, f.num(k));
    j.num("busy_progress_ratio", before > 0 ? during / before : 0);
    j.num("blocktime_ms", f.num("busy_blocktime_ms"));
    return !f.has("error") && f.num("busy_check_ok") != 0;
}

}  // namespace bench

#ifdef BENCH_VMM
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "qmp_client.hpp"

extern char** environ;

namespace bench {
namespace {

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

double num(const json& j, std::initializer_list<const char*> path) {
    const json* p = &j;
    for (const char* k : path) {
        if (!p->is_object() || !p->contains(k)) return 0;
        p = &(*p)[k];
    }
    return p->is_number() ? p->get<double>() : 0;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

Fields run(const std::string& dir, std::size_t bytes) {
    const std::vector<std::string> common{"--memory", fmt::format("{}M", bytes >> 20), "--vcpus", "1",
                                          "--workload", "pattern", "--rate", "0", "--backing", "memfd"};
    std::string err;
    auto dst_args = common;
    dst_args.insert(dst_args.end(), {"--incoming", "tcp:127.0.0.1:0"});
    auto dst = Vm::start(dir, "dst", dst_args, &err);
    if (!dst) return Fields().set_str("error", "busy guest: " + err);
    const auto boot0 = std::chrono::steady_clock::now();
    auto src = Vm::start(dir, "src", common, &err);
    if (!src) return Fields().set_str("error", "busy guest: " + err);
    const double boot_s = seconds_since(boot0);
    auto sc = vmm::QmpClient::connect(src->qmp);
    auto dc = vmm::QmpClient::connect(dst->qmp);
    if (!sc || !dc) return Fields().set_str("error", "busy guest: cannot connect to the management sockets");
    auto fail = [](const char* what, const lazymig::Error& e) {
        return Fields().set_str("error", fmt::format("busy guest: {}: {}", what, e.message()));
    };
    // Both clients negotiated QMP capabilities on connect, so they receive events.

    // Guest progress before: pattern pages/s over one second of the running source.
    auto ops = [](vmm::QmpClient& c) -> std::optional<double> {
        auto r = c.execute("query-status");
        if (!r) return std::nullopt;
        return num(*r, {"workload-status", "operations"});
    };
    const auto b0 = std::chrono::steady_clock::now();
    const auto ops0 = ops(*sc);
    {
        pollfd none{-1, 0, 0};
        ::poll(&none, 0, 1000);  // the measuring window, not a synchronisation
    }
    const auto ops1 = ops(*sc);
    const double before_s = seconds_since(b0);
    if (!ops0 || !ops1) return Fields().set_str("error", "busy guest: query-status failed");
    const double rate_before = (*ops1 - *ops0) / before_s;

    const auto m0 = std::chrono::steady_clock::now();
    if (auto r = sc->execute("migrate", {{"uri", dst->incoming}, {"mode", "postcopy"}}); !r) return fail("migrate", r.error());
    auto status_is = [](const char* s) { return [s](const json& e) { return e["data"].value("status", "") == s; }; };
    auto resumed = dc->wait_event("MIGRATION", status_is("postcopy-active"), 120s);  // QEMU's name
    if (!resumed) return fail("waiting for the destination to resume", resumed.error());
    const auto r0 = std::chrono::steady_clock::now();
    auto done = dc->wait_event("MIGRATION", [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    }, 600s);
    if (!done) return fail("waiting for the destination to complete", done.error());
    const auto ops_dst = ops(*dc);  // the guest's work since it resumed here
    const double during_s = seconds_since(r0);
    const double total_wall_s = seconds_since(m0);
    auto dq = dc->execute("query-migrate");
    auto se = sc->wait_event("MIGRATION", [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    }, 120s);
    auto sq = sc->execute("query-migrate");
    if (!dq || !sq || !se || !ops_dst) return Fields().set_str("error", "busy guest: query-migrate failed");
    Fields f;
    const std::string phase = dq->value("phase", "?");
    if (phase != "completed") f.set_str("error", "busy guest: destination " + phase + ": " + dq->value("error", ""));
    auto check = dc->execute("check-workload");
    const bool check_ok = check && check->value("ok", false);
    if (!check_ok && !f.has("error"))
        f.set_str("error", "busy guest: check-workload: " + (check ? check->value("detail", "") : check.error().message()));
    f.set("busy_boot_s", boot_s)
        .set("busy_total_ms", num(*sq, {"elapsed-ms"}))
        .set("busy_wall_ms", total_wall_s * 1e3)
        .set("busy_postcopy_ms", num(*dq, {"postcopy-ms"}))
        .set("busy_downtime_ms", num(*sq, {"downtime-ms"}))
        .set("busy_faults", num(*dq, {"faults"}))
        .set("busy_pages_demanded", num(*dq, {"pages", "demanded"}))
        .set("busy_pages_pushed", num(*dq, {"pages", "pushed"}))
        .set("busy_blocktime_ms", num(*dq, {"blocktime-ms"}))
        .set("busy_blocktime_reported", std::uint64_t(dq->contains("blocktime-ms")))
        .set("busy_fault_p50_us", num(*dq, {"fault-latency-us", "p50"}))
        .set("busy_fault_p99_us", num(*dq, {"fault-latency-us", "p99"}))
        .set("busy_rate_before", rate_before)
        .set("busy_rate_during", *ops_dst / during_s)
        .set("busy_check_ok", std::uint64_t(check_ok));
    (void)sc->call("quit");
    (void)dc->call("quit");
    src->wait_exit();
    dst->wait_exit();
    return f;
}

}  // namespace

Fields busy_guest_run(std::size_t bytes) {
    char tmpl[] = "/tmp/lazymig-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return Fields().set_str("error", "busy guest: mkdtemp failed");
    Fields f = run(tmpl, bytes);
    std::error_code ec;
    std::filesystem::remove_all(tmpl, ec);
    return f;
}

}  // namespace bench

#else  // lazymig-vmm not built (examples disabled): nothing to drive

namespace bench {
Fields busy_guest_run(std::size_t) { return Fields().set_str("skipped", "lazymig-vmm was not built"); }
}  // namespace bench

#endif
