// chaos_runner: scenario × workload × mode, each a real migration between two
// lazymig-vmm processes through lazymig-fault-proxy, hit by one failure; prints a table
// and exits 1 when a row's outcome differs from what the row expects (and says why).
//
//   chaos_runner --matrix short|full [--only SUBSTRING] [--list]
//
// Environment: LAZYMIG_VMM (lazymig-vmm), LAZYMIG_FAULT_PROXY (lazymig-fault-proxy).
//
// A row's failure is a kill point (LAZYMIG_FAILPOINTS=<point>=kill[:N] in the environment
// of the side that dies) or a proxy command. Every step is bounded: a row that does not
// settle within its deadline is a failed row ("hang"), never a hung runner.
//
// The rows and their expectations are in matrix.cpp. Rows that need issue 11's other
// branches say so (needs: recover, needs: replicate) and are skipped, with the reason
// printed, until their switch in matrix.hpp is turned on.
//
// A row: start the destination (--incoming) and the source, the proxy in between, and
// for kv a writer; migrate through the proxy; inject the fault; (recover); wait until
// every live side settles; then classify (outcome), check the workload on the one VM
// that runs, read back every acknowledged kv write, count running copies, and compare
// with the row's expectation.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "harness.hpp"
#include "kv_writer.hpp"
#include "matrix.hpp"

using namespace vmm;
using namespace vmm::test;
using namespace chaos;
using Clock = std::chrono::steady_clock;

namespace {

// A side that lost its peer settles within its heartbeat timeout (2 s by default) plus
// the time to act on it; after this it counts as a hang.
constexpr std::chrono::seconds kSettle{30};

struct Result {
    Outcome outcome = Outcome::other;
    std::string check = "n/a";        // ok / FAILED: detail / n/a (no VM runs)
    bool check_ok = true;
    std::string kv_lost = "n/a", dups = "n/a";
    std::uint64_t lost = 0, duplicates = 0;
    int running = 0;
    double recover_ms = -1;
    std::string error;                // the surviving sides' error text
    std::vector<std::string> wrong;   // why the row differs from its expectation
    // The row's fault never happened (a kill point not hit, a proxy fault on a link that
    // carried nothing any more): whatever the outcome, the row tested nothing and fails.
    std::string not_reached;
};

// ---- The steps ----

class Proxy {
public:
    Proxy(const TempDir& dir, std::uint16_t target) : control_(dir.file("proxy.sock")) {
        const char* bin = std::getenv("LAZYMIG_FAULT_PROXY");
        proc_ = Process::spawn({bin ? bin : "lazymig-fault-proxy", "--to", std::to_string(target), "--control", control_},
                               dir.file("proxy.log"));
        for (;;) {
            auto line = proc_->read_line(10s);
            if (!line) throw std::runtime_error("fault proxy: no 'ready' within 10 s: " + tail(dir.file("proxy.log")));
            if (line->starts_with("proxy: ")) uri = line->substr(7);
            if (*line == "ready") break;
        }
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un u{};
        u.sun_family = AF_UNIX;
        std::strncpy(u.sun_path, control_.c_str(), sizeof u.sun_path - 1);
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&u), sizeof u) != 0)
            throw std::runtime_error(fmt::format("fault proxy: connect {}: {}", control_, std::strerror(errno)));
        timeval tv{10, 0};
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    ~Proxy() {
        // A clean end first (quit); the Process destructor kills what did not end.
        const std::string q = "quit\n";
        if (fd_ >= 0 && ::send(fd_, q.data(), q.size(), MSG_NOSIGNAL) == ssize_t(q.size())) (void)proc_->wait(5s);
        if (fd_ >= 0) ::close(fd_);
    }
    // The reply's lines; throws on "error" or no reply within 10 s.
    std::string cmd(const std::string& line) {
        const std::string out = line + "\n";
        if (::send(fd_, out.data(), out.size(), MSG_NOSIGNAL) != ssize_t(out.size()))
            throw std::runtime_error("fault proxy: send: " + std::string(std::strerror(errno)));
        std::string reply;
        for (;;) {
            char c;
            if (::recv(fd_, &c, 1, 0) != 1) throw std::runtime_error("fault proxy: no reply to '" + line + "'");
            reply += c;
            if (c != '\n') continue;
            const auto start = reply.rfind('\n', reply.size() - 2);
            const std::string last = reply.substr(start == std::string::npos ? 0 : start + 1);
            if (last.starts_with("error")) throw std::runtime_error("fault proxy: " + line + ": " + last);
            if (last.starts_with("ok")) return reply;
        }
    }
    std::string uri;

private:
    std::string control_;
    std::unique_ptr<Process> proc_;
    int fd_ = -1;
};

std::uint16_t port_of(const std::string& uri) { return std::uint16_t(std::stoi(uri.substr(uri.rfind(':') + 1))); }

// One side: its process, an event client, and whether it is still alive.
struct SideState {
    std::unique_ptr<VmProcess> vm;
    std::optional<QmpClient> events;
    bool dead = false;
    std::optional<json> last;  // its last terminal/paused MIGRATION event

    json query(const std::string& cmd) {
        auto c = vm->connect();
        auto r = c.execute(cmd, json::object(), 30s);
        if (!r) throw std::runtime_error(fmt::format("{} {}: {}", vm->name, cmd, r.error().message()));
        return *r;
    }
};

// `dir` is the caller's, so that a step that throws still leaves the logs to print.
Result run_row(const Row& row, const TempDir& dir) {
    Result res;
    const bool recover = row.fault.recover && row.merged_on();
    const Expect& ex = row.expect();
    // A paused side gives up after 5 s: a lost source (no recover coming) ends the row
    // in seconds, and the runner's own migrate-recover comes well within it.
    const std::vector<std::string> base{"--workload", row.workload, "--recover-timeout-ms", "5000"};
    std::vector<std::string> dargs = base;
    dargs.insert(dargs.end(), {"--incoming", "tcp:127.0.0.1:0"});
    dargs.insert(dargs.end(), row.fault.dst_args.begin(), row.fault.dst_args.end());
    // postcopy_throttle_up: the source holds before GO until the runner writes to this pipe.
    const std::string go_fifo = dir.file("go.fifo");
    std::vector<std::string> src_points, dst_points;
    (row.fault.killed == Side::source ? src_points : dst_points).push_back(row.fault.failpoint);
    if (row.fault.postcopy_throttle_up) {
        if (::mkfifo(go_fifo.c_str(), 0600) != 0) throw std::runtime_error(fmt::format("mkfifo {}: {}", go_fifo, std::strerror(errno)));
        src_points.push_back("source_before_go=hold:" + go_fifo);
    }
    auto env_of = [](const std::vector<std::string>& points) {
        std::string spec;
        for (const auto& p : points)
            if (!p.empty()) spec += (spec.empty() ? "" : ";") + p;
        return spec.empty() ? std::vector<std::string>{} : std::vector<std::string>{"LAZYMIG_FAILPOINTS=" + spec};
    };
    SideState dst, src;
    dst.vm = VmProcess::start(dir, "dst", dargs, env_of(dst_points));
    src.vm = VmProcess::start(dir, "src", base, env_of(src_points));
    dst.events = dst.vm->connect();
    src.events = src.vm->connect();
    Proxy proxy(dir, port_of(dst.vm->incoming));
    if (row.fault.throttle) proxy.cmd(fmt::format("throttle {}", row.fault.throttle));

    std::optional<chaos::KvWriter> kv;
    if (row.workload == "kv") {
        if (src.vm->kv_port <= 0 || dst.vm->kv_port <= 0) throw std::runtime_error("kv workload without kv ports");
        kv.emplace(std::vector<std::uint16_t>{std::uint16_t(src.vm->kv_port), std::uint16_t(dst.vm->kv_port)}, 20000);
        kv->start();
    }
    auto fault_at = Clock::now();
    {
        auto c = src.vm->connect();
        if (!row.fault.params.empty())
            if (auto r = c.execute("migrate-set-parameters", row.fault.params, 30s); !r)
                throw std::runtime_error("migrate-set-parameters: " + r.error().message());
        auto r = c.execute("migrate", {{"uri", proxy.uri}, {"mode", row.mode}}, 30s);
        if (!r) throw std::runtime_error("migrate: " + r.error().message());
    }
    if (row.fault.postcopy_throttle_up) {
        // Pre-copy is over once the source reports the switchover ("device"); it holds
        // before GO until the byte below, so every post-copy byte crosses the throttle.
        auto e = src.events->wait_event("MIGRATION", [](const json& e) { return e["data"]["status"] == "device"; }, 60s);
        if (!e) throw std::runtime_error("the source never reached the switchover: " + e.error().message());
        proxy.cmd(fmt::format("throttle {} up", row.fault.postcopy_throttle_up));
        const int fd = ::open(go_fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0 || ::write(fd, "g", 1) != 1)
            throw std::runtime_error(fmt::format("releasing the source's GO through {}: {}", go_fifo, std::strerror(errno)));
        ::close(fd);
    }

    // The failure.
    if (row.fault.killed != Side::none) {
        SideState& k = row.fault.killed == Side::source ? src : dst;
        // Its death, or the end of its migration without it (the point was never hit);
        // both bounded, watched in turn.
        std::optional<int> st;
        const auto end = Clock::now() + 90s;
        while (!(st = k.vm->proc->wait(200ms)) && Clock::now() < end) {
            auto e = k.events->wait_event("MIGRATION", [](const json& e) {
                const std::string s = e["data"].value("status", "");
                return s == "completed" || s == "failed" || s == "cancelled";
            }, 200ms);
            if (e) {
                k.last = *e;
                break;
            }
        }
        if (!st) {
            res.not_reached = fmt::format("kill point {} was not hit (the {} {})", row.fault.failpoint, k.vm->name,
                                          k.last ? "ended its migration: " + k.last->dump() : "is alive after 90 s");
        } else {
            fault_at = Clock::now();
            k.dead = true;
            if (*st != 128 + SIGKILL)
                res.not_reached = fmt::format("the {} exited {} instead of dying of SIGKILL at {}", k.vm->name, *st, row.fault.failpoint);
            else if (const std::string log = tail(k.vm->log, 100000);
                     log.find("lazymig failpoint " + row.fault.failpoint.substr(0, row.fault.failpoint.find('=')) + ": kill") ==
                     std::string::npos)
                res.not_reached = fmt::format("the {} died of SIGKILL, but its log does not name the kill point {}",
                                              k.vm->name, row.fault.failpoint);
        }
    } else if (!row.fault.proxy.empty()) {
        auto e = src.events->wait_event("MIGRATION", [&](const json& e) { return e["data"]["status"] == row.fault.wait_status; }, 60s);
        if (!e) throw std::runtime_error(fmt::format("the source never reached {}: {}", row.fault.wait_status, e.error().message()));
        fault_at = Clock::now();
        // A fault on a link that carries nothing tests nothing: some connection must be open.
        if (const std::string l = proxy.cmd("list"); l.find(" open\n") == std::string::npos && l.find(" open ") == std::string::npos)
            res.not_reached = "no connection was open when the proxy fault came (the migration had ended): " + l;
        for (const auto& c : row.fault.proxy) {
            const std::string reply = proxy.cmd(c);
            if (reply == "ok cut 0 connections\n") res.not_reached = "the cut found no connection: the migration had ended";
        }
    }

    // Recovery (recover branch): both sides pause, then reconnect through the proxy.
    bool recovered = false;
    if (recover) {
        auto paused = [](const json& e) { return e["data"]["status"] == "postcopy-paused"; };
        for (SideState* s : {&src, &dst}) {
            auto e = s->events->wait_event("MIGRATION", paused, 60s);
            if (!e) throw std::runtime_error(fmt::format("{} never paused: {}", s->vm->name, e.error().message()));
            const std::string phase = s->query("query-migrate").value("phase", "");
            if (phase != "paused") res.wrong.push_back(fmt::format("{} phase '{}' after the link loss, not 'paused'", s->vm->name, phase));
        }
        proxy.cmd("heal");
        proxy.cmd("stall 0");
        std::string dst_uri = dst.vm->incoming, src_uri = proxy.uri;
        if (row.fault.new_address) {
            // A new address: the destination listens on a fresh port, the proxy forwards
            // there from a fresh port of its own.
            dst_uri = "tcp:127.0.0.1:0";
        }
        auto d = dst.vm->connect().execute("migrate-recover", {{"uri", dst_uri}}, 30s);
        if (!d) throw std::runtime_error("destination migrate-recover: " + d.error().message());
        if (row.fault.new_address) {
            // The bound address: in the reply if it says, else query-status's "incoming".
            std::string bound = d->is_object() ? d->value("uri", "") : "";
            if (bound.empty()) bound = dst.query("query-status").value("incoming", "");
            if (bound.empty() || bound.ends_with(":0")) throw std::runtime_error("the destination did not say where it listens again");
            proxy.cmd(fmt::format("target {}", port_of(bound)));
            src_uri = "tcp:127.0.0.1:" + proxy.cmd("listen").substr(3);
            while (!src_uri.empty() && (src_uri.back() == '\n' || src_uri.back() == ' ')) src_uri.pop_back();
        }
        auto s = src.vm->connect().execute("migrate-recover", {{"uri", src_uri}}, 30s);
        if (!s) throw std::runtime_error("source migrate-recover: " + s.error().message());
        recovered = true;
    }

    // Settle: every live side reports an end, bounded.
    for (SideState* s : {&src, &dst}) {
        if (s->dead || s->last) continue;
        auto e = s->events->wait_event("MIGRATION", [&](const json& e) {
            const std::string st = e["data"].value("status", "");
            // A pause is not an end: a side that waits in vain gives up after the
            // recover timeout (5 s) and says so.
            return st == "completed" || st == "failed" || st == "cancelled";
        }, kSettle);
        if (!e) {
            res.wrong.push_back(fmt::format("hang: the {} did not settle within {} s ({})", s->vm->name, kSettle.count(), e.error().message()));
            continue;
        }
        s->last = *e;
    }
    res.recover_ms = std::chrono::duration<double, std::milli>(Clock::now() - fault_at).count();
    // A corrupt fault counts only if a byte was flipped (the proxy's list says where).
    if (std::ranges::any_of(row.fault.proxy, [](const std::string& c) { return c.starts_with("corrupt"); })) {
        const std::string l = proxy.cmd("list");
        if (l.find("corrupted@") == std::string::npos)
            res.not_reached = "the corrupt fault never hit a byte (the transfer ended first): " + l;
    }
    if (kv) kv->stop();

    // What runs where.
    SideState* running = nullptr;
    std::string phases, dst_status;
    bool dst_paused_by_migration = false;  // lazymig stopped its vCPUs (not a poison_on_loss VM)
    for (SideState* s : {&src, &dst}) {
        if (s->dead) {
            phases += fmt::format("{} killed; ", s->vm->name);
            continue;
        }
        const json st = s->query("query-status");
        const json q = s->query("query-migrate");
        phases += fmt::format("{} {} ({}); ", s->vm->name, st.value("status", "?"), q.value("phase", "?"));
        if (s == &dst) {
            dst_status = st.value("status", "");
            if (st.contains("pause-reasons") && st["pause-reasons"].is_array())
                for (const auto& r : st["pause-reasons"]) dst_paused_by_migration |= r == "migration";
        }
        if (q.contains("error") && q["error"].is_string() && !q["error"].get<std::string>().empty())
            res.error += (res.error.empty() ? "" : " | ") + s->vm->name + ": " + q["error"].get<std::string>();
        if (st.value("status", "") == "running") {
            ++res.running;
            running = s;
        }
    }
    const bool src_done = !src.dead && src.last && src.last->at("data").value("status", "") == "completed";
    const bool dst_done = !dst.dead && dst.last && dst.last->at("data").value("status", "") == "completed";
    if (src_done && dst_done && running == &dst) res.outcome = recovered ? Outcome::recovered : Outcome::completed;
    else if (running == &src && res.running == 1) res.outcome = Outcome::resumed_on_source;
    else if (std::ranges::find(row.fault.dst_args, "--poison-on-loss") != row.fault.dst_args.end() && src.dead && !dst.dead &&
             !dst_paused_by_migration && (running == &dst || dst_status == "internal-error"))
        res.outcome = Outcome::poisoned;  // --poison-on-loss: the VM went on without its source (a vCPU
                                          // that touched a poisoned page stopped: internal-error)
    else if (res.running == 0) res.outcome = Outcome::stopped_with_error;
    else res.outcome = Outcome::other;
    if (res.outcome == Outcome::other) res.wrong.push_back("state: " + phases);

    // The workload's own check on the one VM that runs (or ran on, poisoned).
    if (res.outcome == Outcome::poisoned && !running) running = &dst;
    if (running && (res.running == 1 || res.outcome == Outcome::poisoned)) {
        const json c = running->query("check-workload");
        res.check_ok = c.value("ok", false);
        res.check = res.check_ok ? "ok" : "FAILED: " + c.value("detail", "");
        if (!res.check_ok && !ex.check_fails_with_poison) res.wrong.push_back("silent corruption: " + res.check);
        if (ex.check_fails_with_poison && (res.check_ok || res.check.find("poisoned") == std::string::npos))
            res.wrong.push_back("the checker should name a poisoned page: " + res.check);
    }
    // No VM runs: the destination that stopped may hold pages that never arrived
    // (poisoned), but never a wrong one: its checker may only name poisoned pages.
    // (Only one that ran the VM: before GO, pages that never arrived are not poisoned and
    // a check would wait for them.)
    if (res.running == 0 && !dst.dead && res.outcome == Outcome::stopped_with_error &&
        res.error.find("pages never arrived") != std::string::npos) {
        const json c = dst.query("check-workload");
        const std::string detail = c.value("detail", "");
        res.check = c.value("ok", false) ? "dst ok" : detail.find("never arrived (poisoned)") != std::string::npos ? "dst poisoned" : "FAILED: " + detail;
        if (res.check.starts_with("FAILED")) res.wrong.push_back("a bad page on the stopped destination: " + detail);
    }
    if (res.running > 1) res.wrong.push_back(fmt::format("{} running copies", res.running));

    // kv: every acknowledged write is in the VM that runs; no ack was seen twice.
    if (kv) {
        res.duplicates = kv->duplicates();
        res.dups = std::to_string(res.duplicates);
        if (res.duplicates) res.wrong.push_back(fmt::format("{} duplicate outputs", res.duplicates));
        if (running && res.running == 1) {
            const auto v = kv->verify(std::uint16_t(running->vm->name == "src" ? src.vm->kv_port : dst.vm->kv_port));
            if (!v.error.empty()) {
                res.kv_lost = "?";
                res.wrong.push_back("kv verify: " + v.error);
            } else {
                res.lost = v.missing + v.wrong;
                res.kv_lost = fmt::format("{}/{}", res.lost, kv->acked());
                if (res.lost) res.wrong.push_back(fmt::format("{} acknowledged writes lost ({} missing, {} wrong)", res.lost, v.missing, v.wrong));
            }
        } else {
            res.kv_lost = fmt::format("-/{}", kv->acked());  // no VM runs: the service is down, not a loss
        }
    }

    // The expectation.
    if (!ex.outcomes.contains(res.outcome)) {
        std::string want;
        for (auto o : ex.outcomes) want += (want.empty() ? "" : " or ") + std::string(name(o));
        res.wrong.push_back(fmt::format("outcome '{}', expected {} [{}] error: {}", name(res.outcome), want, phases, res.error));
    }
    auto says = [&](const std::string& alternatives) {
        for (std::size_t at = 0;;) {
            const auto bar = alternatives.find('|', at);
            if (res.error.find(alternatives.substr(at, bar == std::string::npos ? bar : bar - at)) != std::string::npos) return true;
            if (bar == std::string::npos) return false;
            at = bar + 1;
        }
    };
    if (res.outcome == Outcome::stopped_with_error && !ex.error.empty() && !says(ex.error))
        res.wrong.push_back(fmt::format("the error should say '{}': '{}'", ex.error, res.error));
    if (res.outcome == Outcome::stopped_with_error && res.error.empty())
        res.wrong.push_back("stopped without saying why");
    if (!res.not_reached.empty()) res.wrong.insert(res.wrong.begin(), "fault not reached: " + res.not_reached);
    if (!res.wrong.empty()) {
        res.wrong.push_back("src log: " + tail(src.vm->log, 4000));
        res.wrong.push_back("dst log: " + tail(dst.vm->log, 4000));
    }
    // Whatever lives quits; the destructors kill what does not.
    for (SideState* s : {&src, &dst})
        if (!s->dead) {
            auto c = QmpClient::connect(s->vm->qmp);
            if (c) (void)c->call("quit", json::object(), 10s);
        }
    return res;
}

struct Options {
    std::string which = "short", only;
    bool list = false;
} g_opts;
int g_status = 0;

int run_matrix() {
    const std::string& which = g_opts.which;
    const std::string& only = g_opts.only;
    std::vector<Row> rows;
    for (auto& r : matrix())
        if ((which == "full" || r.in_short == r.workload) && (only.empty() || r.id().find(only) != std::string::npos)) rows.push_back(r);
    if (g_opts.list) {
        for (const auto& r : rows) fmt::print("{}{}\n", r.id(), r.needs.empty() ? "" : "  needs: " + r.needs);
        return 0;
    }
    // The kill points of the whole matrix, and which wait for the merge.
    {
        std::set<std::string> now, later;
        for (const auto& r : matrix()) {
            if (r.fault.failpoint.empty()) continue;
            const std::string point = r.fault.failpoint.substr(0, r.fault.failpoint.find('='));
            (r.today.outcomes.empty() && !r.merged_on() ? later : now).insert(point);
        }
        std::string a, b;
        for (const auto& p : now) a += " " + p;
        for (const auto& p : later)
            if (!now.contains(p)) b += " " + p;
        fmt::print("kill points:{}\nkill points after the merge:{}\n", a, b);
    }
    const auto header = fmt::format("{:<40} {:<9} {:<8} {:<26} {:<12} {:<9} {:<5} {:<8} {:>9}  {}", "scenario", "mode",
                                    "workload", "outcome", "check", "kv lost", "dups", "running", "recover", "verdict");
    fmt::print("{}\n{}\n", header, std::string(header.size() + 4, '-'));
    std::fflush(stdout);
    int failed = 0, passed = 0, skipped = 0, unreached = 0;
    std::vector<std::string> reasons;
    for (const auto& r : rows) {
        if (!r.enabled()) {
            ++skipped;
            fmt::print("{:<40} {:<9} {:<8} skipped: needs {} (not on this branch)\n", r.scenario, r.mode, r.workload, r.needs);
            continue;
        }
        Result res;
        TempDir dir;  // outlives the row's processes (they end with run_row's stack)
        auto logs = [&] {
            for (const char* side : {"src", "dst"}) res.wrong.push_back(fmt::format("{} log: {}", side, tail(dir.file(std::string(side) + ".log"), 4000)));
        };
        try {
            res = run_row(r, dir);
        } catch (const std::exception& e) {
            res.outcome = Outcome::other;
            res.wrong.push_back(std::string("step failed: ") + e.what());
            logs();
        } catch (...) {  // a harness REQUIRE (doctest reported it above)
            res.outcome = Outcome::other;
            res.wrong.push_back("step failed: a harness assertion (see above)");
            logs();
        }
        const bool ok = res.wrong.empty();
        (ok ? passed : failed) += 1;
        if (!res.not_reached.empty()) ++unreached;
        fmt::print("{:<40} {:<9} {:<8} {:<26} {:<12} {:<9} {:<5} {:<8} {:>7.1f}ms  {}\n", r.scenario, r.mode, r.workload,
                   name(res.outcome), res.check.substr(0, 12), res.kv_lost, res.dups, res.running, res.recover_ms,
                   (ok ? "as expected" : !res.not_reached.empty() ? "FAULT NOT REACHED" : "DIFFERS") + (r.needs.empty() || r.merged_on() ? "" : " (today's; merged needs " + r.needs + ")"));
        if (!res.error.empty()) fmt::print("    error: {}\n", res.error.substr(0, 300));
        if (!ok) {
            for (const auto& w : res.wrong) fmt::print("    why: {}\n", w);
        }
        std::fflush(stdout);
    }
    fmt::print("chaos: {} rows as expected, {} differ ({} of them: fault not reached), {} skipped (need the merge)\n",
               passed, failed, unreached, skipped);
    return failed ? 1 : 0;
}

}  // namespace

// The harness (tests/vmm/harness.hpp) asserts with doctest: the matrix runs as one test
// case, so a failed step is reported with its context and fails the run.
TEST_CASE("chaos/matrix") { g_status = run_matrix(); }

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--matrix" && i + 1 < argc) g_opts.which = argv[++i];
        else if (a == "--only" && i + 1 < argc) g_opts.only = argv[++i];
        else if (a == "--list") g_opts.list = true;
        else return std::fprintf(stderr, "usage: chaos_runner [--matrix short|full] [--only SUBSTRING] [--list]\n"), 2;
    }
    if (g_opts.which != "short" && g_opts.which != "full") return std::fprintf(stderr, "chaos_runner: --matrix short or full\n"), 2;
    ::signal(SIGPIPE, SIG_IGN);
    doctest::Context ctx;
    ctx.setOption("no-version", true);
    ctx.setOption("no-intro", true);
    const int rc = ctx.run();
    return rc != 0 ? rc : g_status;
}
