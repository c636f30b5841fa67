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
// Rows that need issue 11's other branches say so (needs: recover, needs: replicate)
// and are skipped, with the reason printed, until the switch below is turned on.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/socket.h>
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

using namespace vmm;
using namespace vmm::test;
using Clock = std::chrono::steady_clock;

namespace {

// ---- Switches for the merge: one line each. ----
// recover branch: migrate-pause, migrate-recover {"uri"}, phases paused/recovering,
// --poison-on-loss; link loss pauses both sides instead of failing them.
constexpr bool kHaveRecover = false;
// replicate branch: back-replication epochs, output commit, lease; the epoch kill
// points; the source resumes from the last committed epoch when the destination is lost.
constexpr bool kHaveReplicate = false;

// A side that lost its peer settles within its heartbeat timeout (2 s by default) plus
// the time to act on it; after this it counts as a hang.
constexpr std::chrono::seconds kSettle{30};

enum class Outcome { completed, resumed_on_source, recovered, stopped_with_error, poisoned, other };
const char* name(Outcome o) {
    switch (o) {
    case Outcome::completed: return "completed";
    case Outcome::resumed_on_source: return "resumed on source";
    case Outcome::recovered: return "recovered after reconnect";
    case Outcome::stopped_with_error: return "VM stopped with error";
    case Outcome::poisoned: return "runs, missing pages poisoned";
    default: return "other";
    }
}

enum class Side { none, source, destination };

// What a row does to the migration.
struct Fault {
    Side killed = Side::none;
    std::string failpoint;            // "<point>=kill[:N]" in the killed side's environment
    std::string wait_status;          // proxy fault: after the source's MIGRATION status ...
    std::vector<std::string> proxy;   // ... these proxy commands
    bool recover = false;             // then migrate-recover on both sides (needs recover)
    bool new_address = false;         // ... to a new destination address and proxy port
    std::uint64_t throttle = 0;       // the link's rate during the migration (bytes/s); 0: free
    std::vector<std::string> dst_args;  // more `run` options for the destination
    json params = json::object();     // migrate-set-parameters on the source before migrate
};

struct Expect {
    std::set<Outcome> outcomes;
    std::string error;                // substring of the surviving side's error, when stopped
    bool check_fails_with_poison = false;  // poison-on-loss: the checker names a poisoned page
};

struct Row {
    std::string scenario, mode, workload;
    Fault fault;
    Expect today, merged;             // merged: with the features of `needs` on
    std::string needs;                // "", "recover", "replicate", "recover+replicate"
    std::string in_short;             // the workload this row runs with in --matrix short; "": none

    // Every feature the row needs is on this branch.
    [[nodiscard]] bool merged_on() const {
        if (needs.find("recover") != std::string::npos && !kHaveRecover) return false;
        if (needs.find("replicate") != std::string::npos && !kHaveReplicate) return false;
        return true;
    }
    // Runs: with its merged expectation once the features are on; before that only if
    // it has an expectation for today (then without the steps that need them).
    [[nodiscard]] bool enabled() const { return merged_on() || !today.outcomes.empty(); }
    [[nodiscard]] const Expect& expect() const { return needs.empty() ? today : merged_on() ? merged : today; }
    [[nodiscard]] std::string id() const { return scenario + "/" + mode + "/" + workload; }
};

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

Result run_row(const Row& row) {
    Result res;
    const bool recover = row.fault.recover && row.merged_on();
    const Expect& ex = row.expect();
    TempDir dir;
    const std::vector<std::string> base{"--workload", row.workload};
    std::vector<std::string> dargs = base;
    dargs.insert(dargs.end(), {"--incoming", "tcp:127.0.0.1:0"});
    dargs.insert(dargs.end(), row.fault.dst_args.begin(), row.fault.dst_args.end());
    const std::string fp_env = "LAZYMIG_FAILPOINTS=" + row.fault.failpoint;
    SideState dst, src;
    dst.vm = VmProcess::start(dir, "dst", dargs, row.fault.killed == Side::destination ? std::vector{fp_env} : std::vector<std::string>{});
    src.vm = VmProcess::start(dir, "src", base, row.fault.killed == Side::source ? std::vector{fp_env} : std::vector<std::string>{});
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
            res.wrong.push_back(fmt::format("kill point {} was not hit (the {} {})", row.fault.failpoint, k.vm->name,
                                            k.last ? "ended its migration: " + k.last->dump() : "is alive after 90 s"));
        } else {
            fault_at = Clock::now();
            k.dead = true;
            if (*st != 128 + SIGKILL) res.wrong.push_back(fmt::format("the {} exited {} instead of dying of SIGKILL", k.vm->name, *st));
        }
    } else if (!row.fault.proxy.empty()) {
        auto e = src.events->wait_event("MIGRATION", [&](const json& e) { return e["data"]["status"] == row.fault.wait_status; }, 60s);
        if (!e) throw std::runtime_error(fmt::format("the source never reached {}: {}", row.fault.wait_status, e.error().message()));
        fault_at = Clock::now();
        for (const auto& c : row.fault.proxy) {
            const std::string reply = proxy.cmd(c);
            if (reply == "ok cut 0 connections\n") res.wrong.push_back("the cut found no connection: the migration had ended");
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

    // Settle: every live side reports an end (or a pause), bounded.
    for (SideState* s : {&src, &dst}) {
        if (s->dead || s->last) continue;
        auto e = s->events->wait_event("MIGRATION", [&](const json& e) {
            const std::string st = e["data"].value("status", "");
            return st == "completed" || st == "failed" || st == "cancelled" || (!recover && st == "postcopy-paused");
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
            res.wrong.push_back("the corrupt fault never hit a byte (the transfer ended first): " + l);
    }
    if (kv) kv->stop();

    // What runs where.
    SideState* running = nullptr;
    std::string phases, dst_status;
    for (SideState* s : {&src, &dst}) {
        if (s->dead) {
            phases += fmt::format("{} killed; ", s->vm->name);
            continue;
        }
        const json st = s->query("query-status");
        const json q = s->query("query-migrate");
        phases += fmt::format("{} {} ({}); ", s->vm->name, st.value("status", "?"), q.value("phase", "?"));
        if (s == &dst) dst_status = st.value("status", "");
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
             (running == &dst || dst_status == "internal-error"))
        res.outcome = Outcome::poisoned;  // --poison-on-loss: the VM went on without its source
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
    if (res.outcome == Outcome::stopped_with_error && !ex.error.empty() && res.error.find(ex.error) == std::string::npos)
        res.wrong.push_back(fmt::format("the error should say '{}': '{}'", ex.error, res.error));
    if (res.outcome == Outcome::stopped_with_error && res.error.empty())
        res.wrong.push_back("stopped without saying why");
    if (!res.wrong.empty()) {
        res.wrong.push_back("src log: " + tail(src.vm->log, 1500));
        res.wrong.push_back("dst log: " + tail(dst.vm->log, 1500));
    }
    // Whatever lives quits; the destructors kill what does not.
    for (SideState* s : {&src, &dst})
        if (!s->dead) {
            auto c = QmpClient::connect(s->vm->qmp);
            if (c) (void)c->call("quit", json::object(), 10s);
        }
    return res;
}

// ---- The matrix ----

std::vector<Row> matrix() {
    using O = Outcome;
    std::vector<Row> rows;
    const std::vector<std::string> workloads{"pattern", "bank", "kv"};
    auto add = [&](Row r) {
        for (const auto& w : workloads) {
            r.workload = w;
            rows.push_back(r);
        }
    };
    const Expect resumed{{O::resumed_on_source}, ""};
    const Expect recovered{{O::recovered}, ""};
    const Expect stopped_missing{{O::stopped_with_error}, "pages never arrived"};
    // The source died before GO: the destination never ran the VM and says so.
    const Expect src_lost_early{{O::stopped_with_error}, "the source closed the connection"};
    // The destination died after GO: the source cannot know it never ran the VM.
    const Expect dst_lost_after_go{{O::stopped_with_error}, "GO was sent, so the destination may be running the VM: it was not resumed here"};

    for (const std::string mode : {"postcopy", "hybrid", "precopy"}) {
        const bool pre = mode != "postcopy";
        // Pre-copy: the destination dies while it receives round 1 → the VM never left.
        if (pre) {
            add({.scenario = "dst-killed-during-precopy", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "pager_bulk_before_place=kill:8"},
                 .today = resumed, .merged = resumed, .in_short = mode == "hybrid" ? "bank" : ""});
            // The source host dies while it pre-copies: it held the only running copy.
            // (mid round 1, and at the start of round 2 of a pre-copy the link slows).
            add({.scenario = "src-killed-during-precopy", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_precopy_batch=kill:8"},
                 .today = src_lost_early, .merged = src_lost_early, .in_short = mode == "precopy" ? "pattern" : ""});
            add({.scenario = "src-killed-at-precopy-round-2", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_precopy_round=kill:2", .throttle = 30'000'000,
                           .params = {{"compression", "off"}, {"downtime-limit", 1}}},
                 .today = src_lost_early, .merged = src_lost_early});
        }
        // Switchover: the destination dies with the device state in hand, before GO.
        add({.scenario = "dst-killed-before-go", .mode = mode,
             .fault = {.killed = Side::destination, .failpoint = "destination_before_device_loaded=kill"},
             .today = resumed, .merged = resumed, .in_short = mode == "postcopy" ? "kv" : ""});
        // The source dies just before GO: the destination never got the VM.
        add({.scenario = "src-killed-before-go", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_before_go=kill"},
             .today = src_lost_early, .merged = src_lost_early});
        if (mode == "precopy") continue;  // the rest is post-copy
        // Mid post-copy, the source dies: the pages it still held are gone.
        add({.scenario = "src-killed-mid-postcopy", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_push_batch=kill:4"},
             .today = stopped_missing, .merged = stopped_missing, .in_short = mode == "postcopy" ? "pattern" : ""});
        // ... or while it serves a demand fault (post-copy: every touch is a request).
        if (mode == "postcopy")
            add({.scenario = "src-killed-serving-a-fault", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_serve_request=kill:3"},
                 .today = stopped_missing, .merged = stopped_missing});
        // ... and with --poison-on-loss the VM goes on; only the missing pages fault.
        add({.scenario = "src-killed-mid-postcopy-poison", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_push_batch=kill:4", .dst_args = {"--poison-on-loss"}},
             .today = {}, .merged = {{O::poisoned}, "", true}, .needs = "recover",
             .in_short = mode == "postcopy" ? "pattern" : ""});
        // The destination dies after GO: post-copy cannot bring the VM back (it ran
        // there); hybrid resumes it on the source from the last committed epoch.
        // (After GO the source must say that the destination may run the VM; mid
        // post-copy, that the destination went away.)
        const Expect dst_lost_mid{{O::stopped_with_error}, "the destination closed the connection"};
        for (const auto& [scenario, fp, lost] : std::vector<std::tuple<std::string, std::string, Expect>>{
                 {"dst-killed-after-go", "destination_after_go=kill", dst_lost_after_go},
                 {"dst-killed-mid-postcopy", "pager_urgent_before_place=kill:2", dst_lost_mid}}) {
            if (mode == "postcopy")
                add({.scenario = scenario, .mode = mode, .fault = {.killed = Side::destination, .failpoint = fp},
                     .today = lost, .merged = lost, .in_short = scenario == "dst-killed-after-go" ? "kv" : ""});
            else if (scenario == "dst-killed-after-go")  // hybrid mid post-copy: the epoch points below
                add({.scenario = scenario, .mode = mode, .fault = {.killed = Side::destination, .failpoint = fp},
                     .today = lost, .merged = resumed, .needs = "replicate", .in_short = "kv"});
        }
        if (mode == "hybrid") {
            add({.scenario = "dst-killed-mid-epoch-send", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "destination_epoch_send=kill:3"},
                 .today = {}, .merged = resumed, .needs = "replicate"});
            add({.scenario = "dst-killed-after-commit-before-release", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "destination_epoch_committed=kill:2"},
                 .today = {}, .merged = resumed, .needs = "replicate", .in_short = "kv"});
            add({.scenario = "src-killed-epoch-apply", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_epoch_apply=kill:2"},
                 .today = {}, .merged = {{O::completed, O::stopped_with_error}, ""}, .needs = "replicate"});
        }
    }
    // Link loss: paused, then migrate-recover, then completed — in every mode.
    for (const std::string mode : {"postcopy", "hybrid", "precopy"}) {
        const std::string when = mode == "precopy" ? "active" : "postcopy-active";
        const std::uint64_t slow = 20'000'000;  // 64 MiB take seconds: the fault lands mid-transfer
        add({.scenario = "cut", .mode = mode, .fault = {.wait_status = when, .proxy = {"cut"}, .recover = true, .throttle = slow},
             .today = {}, .merged = recovered, .needs = "recover", .in_short = mode == "postcopy" ? "kv" : ""});
        add({.scenario = "cut-recover-new-address", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"cut"}, .recover = true, .new_address = true, .throttle = slow},
             .today = {}, .merged = recovered, .needs = "recover"});
        add({.scenario = "stall-past-heartbeat", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"stall 20000"}, .recover = true, .throttle = slow},
             .today = {}, .merged = recovered, .needs = "recover", .in_short = mode == "hybrid" ? "bank" : ""});
        add({.scenario = "close-one-bulk-channel", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"close 2"}, .recover = true, .throttle = slow},
             .today = {}, .merged = recovered, .needs = "recover"});
        // A flipped byte: TLS refuses the record (no bad frame is placed). Today that
        // fails the migration; in post-copy the VM stops on the destination naming the
        // pages that never arrived.
        add({.scenario = "corrupt", .mode = mode, .fault = {.wait_status = when, .proxy = {"corrupt"}, .recover = true, .throttle = slow},
             .today = mode == "precopy" ? Expect{} : Expect{{O::stopped_with_error}, "TLS"}, .merged = recovered, .needs = "recover",
             .in_short = mode == "postcopy" ? "bank" : ""});
        // During pre-copy, the VM never left: today it must keep running on the source.
        if (mode != "postcopy")
            add({.scenario = "corrupt-during-precopy", .mode = mode,
                 .fault = {.wait_status = "active", .proxy = {"corrupt"}, .recover = true, .throttle = 4'000'000,
                           .params = {{"compression", "off"}}},
                 .today = resumed, .merged = recovered, .needs = "recover"});
    }
    return rows;
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
    int failed = 0, passed = 0, skipped = 0;
    std::vector<std::string> reasons;
    for (const auto& r : rows) {
        if (!r.enabled()) {
            ++skipped;
            fmt::print("{:<40} {:<9} {:<8} skipped: needs {} (not on this branch)\n", r.scenario, r.mode, r.workload, r.needs);
            continue;
        }
        Result res;
        try {
            res = run_row(r);
        } catch (const std::exception& e) {
            res.outcome = Outcome::other;
            res.wrong.push_back(std::string("step failed: ") + e.what());
        } catch (...) {  // a harness REQUIRE (doctest reported it above)
            res.outcome = Outcome::other;
            res.wrong.push_back("step failed: a harness assertion (see above)");
        }
        const bool ok = res.wrong.empty();
        (ok ? passed : failed) += 1;
        fmt::print("{:<40} {:<9} {:<8} {:<26} {:<12} {:<9} {:<5} {:<8} {:>7.1f}ms  {}\n", r.scenario, r.mode, r.workload,
                   name(res.outcome), res.check.substr(0, 12), res.kv_lost, res.dups, res.running, res.recover_ms,
                   (ok ? "as expected" : "DIFFERS") + (r.needs.empty() || r.merged_on() ? "" : " (today's; merged needs " + r.needs + ")"));
        if (!res.error.empty()) fmt::print("    error: {}\n", res.error.substr(0, 300));
        if (!ok) {
            for (const auto& w : res.wrong) fmt::print("    why: {}\n", w);
        }
        std::fflush(stdout);
    }
    fmt::print("chaos: {} rows as expected, {} differ, {} skipped (need the merge)\n", passed, failed, skipped);
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
