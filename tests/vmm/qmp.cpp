// vmm/qmp/*: the management socket of a real lazymig-vmm process — every command, bad
// input of every kind, commands in the wrong phase, and clients that misbehave.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cstring>
#include <fstream>
#include <unistd.h>

#include <doctest/doctest.h>

#include "harness.hpp"
#include "lazymig/lazymig.hpp"
#include "lazymig/version.h"

using namespace vmm;
using namespace vmm::test;

namespace {
std::string error_class(const json& r) { return r.contains("error") ? r["error"].value("class", "") : "(no error)"; }
std::string error_desc(const json& r) { return r.contains("error") ? r["error"].value("desc", "") : r.dump(); }
}  // namespace

TEST_CASE("vmm/qmp/every-command") {
    TempDir dir;
    auto vm = VmProcess::start(dir, "vm", {"--workload", "pattern"});
    INFO("vm log: " << vm->log_tail());

    auto st = vm->execute("query-status");
    CHECK(st["status"] == "running");
    CHECK(st["running"] == true);
    CHECK(st["workload"] == "pattern");
    CHECK(st["vcpus"] == 2);
    CHECK(st["memory"] == 64u << 20);
    CHECK(st["incoming"].is_null());

    CHECK(vm->execute("stop").empty());
    st = vm->execute("query-status");
    CHECK(st["status"] == "paused");
    CHECK(st["pause-reasons"] == json::array({"user"}));
    auto check = vm->execute("check-workload");  // works paused too
    CHECK(check["ok"] == true);
    CHECK(vm->execute("cont").empty());
    CHECK(vm->execute("query-status")["status"] == "running");

    check = vm->execute("check-workload");
    CHECK(check["ok"] == true);
    CHECK(check["detail"].get<std::string>().starts_with("pattern: 16383 pages consistent"));

    CHECK(vm->execute("query-migrate")["phase"] == "none");
    CHECK(vm->execute("migrate-set-parameters", {{"max-bandwidth", 50'000'000}, {"push-batch-pages", 64}, {"prefetch-pages", 8}})
              .empty());
    auto params = vm->execute("query-migrate-parameters");
    CHECK(params == json{{"max-bandwidth", 50'000'000}, {"push-batch-pages", 64}, {"prefetch-pages", 8},
                         {"bulk-channels", lazymig::default_bulk_channels()}, {"downtime-limit", 300},
                         {"max-rounds", 30}, {"max-precopy-bytes", 0}, {"max-precopy-ms", 0}, {"compression", "auto"}});
    CHECK(vm->execute("migrate-set-parameters", {{"downtime-limit", 50}, {"max-rounds", 5}, {"max-precopy-bytes", 1 << 30},
                                                 {"max-precopy-ms", 20000}})
              .empty());
    params = vm->execute("query-migrate-parameters");
    CHECK(params["downtime-limit"] == 50);
    CHECK(params["max-rounds"] == 5);
    CHECK(params["max-precopy-bytes"] == 1 << 30);
    CHECK(params["max-precopy-ms"] == 20000);
    CHECK(params["max-bandwidth"] == 50'000'000);  // left as it was
    CHECK(vm->execute("migrate-set-parameters", {{"compression", "off"}}).empty());
    CHECK(vm->execute("query-migrate-parameters")["compression"] == "off");
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"compression", "zstd"}})) ==
          "compression must be off, on or auto, not 'zstd'");
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"max-rounds", -1}})).find("max-rounds") != std::string::npos);
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"bulk-channels", 0}})) == "bulk-channels must be 1..16");
    CHECK(vm->execute("migrate-set-parameters", {{"bulk-channels", 3}}).empty());
    CHECK(vm->execute("query-migrate-parameters")["bulk-channels"] == 3);

    auto r = vm->call("migrate-cancel");
    CHECK(error_desc(r) == "no migration in progress");

    auto names = vm->execute("query-commands");
    CHECK(names.size() == 15);
    auto version = vm->execute("query-version");
    CHECK(version["package"] == "lazymig " LAZYMIG_VERSION_STRING);
    CHECK(version["qemu"]["major"] == LAZYMIG_VERSION_MAJOR);

    CHECK(vm->quit() == 0);
}

TEST_CASE("vmm/qmp/bad-requests") {
    TempDir dir;
    auto vm = VmProcess::start(dir, "vm", {"--workload", "idle"});
    INFO("vm log: " << vm->log_tail());
    auto c = vm->connect();
    auto raw = [&](const std::string& line) {
        REQUIRE(c.send_raw(line + "\n").has_value());
        auto l = c.read_line(10s);
        REQUIRE_MESSAGE(l.has_value(), why(l));
        return json::parse(*l);
    };

    auto r = raw("{\"execute\": \"query-status\"");  // truncated JSON
    CHECK(error_class(r) == "GenericError");
    CHECK(error_desc(r).starts_with("JSON parse error"));
    CHECK(error_desc(raw("not json at all")).starts_with("JSON parse error"));
    CHECK(error_desc(raw("{ \"execute\": }")) == "JSON parse error, expecting value");  // qmp-spec's example
    CHECK(error_desc(raw("[1, 2, 3]")) == "QMP input must be a JSON object");
    CHECK(error_desc(raw("{}")) == "QMP input lacks member 'execute'");
    CHECK(error_desc(raw("{\"execute\": 42}")) == "QMP input member 'execute' must be a string");
    CHECK(error_desc(raw("{\"execute\": \"stop\", \"arguments\": []}")) == "QMP input member 'arguments' must be an object");
    CHECK(error_desc(raw("{\"execute\": \"stop\", \"extra\": 1}")) == "QMP input member 'extra' is unexpected");

    r = raw("{\"execute\": \"reboot-the-moon\"}");
    CHECK(error_class(r) == "CommandNotFound");
    CHECK(error_desc(r) == "The command reboot-the-moon has not been found");
    r = raw("{\"execute\": \"qmp_capabilities\"}");
    CHECK(error_class(r) == "CommandNotFound");
    CHECK(error_desc(r) == "Capabilities negotiation is already complete, command ignored");

    // Arguments: missing, ill-typed, out of range, unexpected.
    CHECK(error_desc(vm->call("migrate")) == "missing argument 'uri'");
    CHECK(error_desc(vm->call("migrate", {{"uri", 7}})) == "argument 'uri' must be a string");
    CHECK(error_desc(vm->call("migrate", {{"uri", "tcp:127.0.0.1:1"}, {"mode", "sideways"}}))
              .starts_with("unknown mode 'sideways'"));
    CHECK(error_desc(vm->call("migrate", {{"uri", "tcp:127.0.0.1:1"}, {"speed", 1}})) == "unexpected argument 'speed'");
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"max-bandwidth", "fast"}}))
              .starts_with("argument 'max-bandwidth' must be an integer"));
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"prefetch-pages", -1}}))
              .starts_with("argument 'prefetch-pages' must be an integer"));
    CHECK(error_desc(vm->call("migrate-set-parameters", {{"push-batch-pages", 0}})) == "push-batch-pages must be 1..65536");
    CHECK(error_desc(vm->call("migrate-set-parameters")).starts_with("give at least one of"));
    CHECK(error_desc(vm->call("stop", {{"now", true}})) == "unexpected argument 'now'");

    // An id comes back with the answer, error or not.
    r = raw("{\"execute\": \"query-status\", \"id\": \"a-1\"}");
    CHECK(r["id"] == "a-1");
    CHECK(r.contains("return"));
    r = raw("{\"execute\": \"nope\", \"id\": 9}");
    CHECK(r["id"] == 9);
    CHECK(error_class(r) == "CommandNotFound");

    // Several requests in one write are answered in order; blank lines are ignored.
    REQUIRE(c.send_raw("\n{\"execute\":\"stop\"}\n\n{\"execute\":\"cont\"}\n").has_value());
    CHECK(json::parse(c.read_line(10s).value()).contains("return"));
    CHECK(json::parse(c.read_line(10s).value()).contains("return"));

    CHECK(vm->execute("query-status")["status"] == "running");
    CHECK(vm->quit() == 0);
}

TEST_CASE("vmm/qmp/client-disconnects-mid-command") {
    TempDir dir;
    auto vm = VmProcess::start(dir, "vm", {"--workload", "bank"});
    INFO("vm log: " << vm->log_tail());
    for (int i = 0; i < 3; ++i) {
        auto c = vm->connect();
        REQUIRE(c.send_raw("{\"execute\": \"qu").has_value());  // half of `quit`, then gone
        c.close();
    }
    {
        auto c = vm->connect();  // a full command, then gone before reading the answer
        REQUIRE(c.send_raw("{\"execute\": \"check-workload\"}\n").has_value());
        c.close();
    }
    // Deferred commands run in order: once this check answers, the abandoned one is done
    // (a check pauses the vCPUs while it reads, so query-status before it may say paused).
    CHECK(vm->execute("check-workload")["ok"] == true);
    auto st = vm->execute("query-status");
    CHECK(st["status"] == "running");
    CHECK(vm->quit() == 0);
}

TEST_CASE("vmm/qmp/long-command-blocks-no-other-client") {
    // check-workload reads all of guest RAM; it runs on the server's worker, held here
    // on a FIFO (LAZYMIG_VMM_HOLD_CHECK) until the other clients have been answered.
    TempDir dir;
    const std::string release = dir.file("hold");
    REQUIRE(::mkfifo(release.c_str(), 0600) == 0);
    auto vm = VmProcess::start(dir, "vm", {"--workload", "bank"}, {"LAZYMIG_VMM_HOLD_CHECK=" + release});
    INFO("vm log: " << vm->log_tail());
    auto slow = vm->connect();
    // Two requests in one write: the second waits behind the first (QMP answers in order).
    REQUIRE(slow.send_raw("{\"execute\": \"check-workload\", \"id\": 1}\n"
                          "{\"execute\": \"query-version\", \"id\": 2}\n").has_value());
    for (int i = 0; i < 3; ++i) {
        auto other = vm->connect();
        auto st = other.execute("query-status");
        REQUIRE_MESSAGE(st.has_value(), st.error().message());
        CHECK((*st)["status"] == "running");
    }
    CHECK(vm->execute("query-status")["status"] == "running");
    // Nothing for the held client yet: its check has not run.
    CHECK_FALSE(slow.read_line(0ms).has_value());
    {
        const int w = ::open(release.c_str(), O_WRONLY | O_CLOEXEC);
        REQUIRE(w >= 0);
        REQUIRE(::write(w, "x", 1) == 1);
        ::close(w);
    }
    auto first = slow.read_line(60s);
    REQUIRE(first.has_value());
    const json a = json::parse(*first);
    CHECK(a["id"] == 1);
    CHECK(a["return"]["ok"] == true);
    auto second = slow.read_line(60s);
    REQUIRE(second.has_value());
    const json b = json::parse(*second);
    CHECK(b["id"] == 2);
    CHECK(b["return"].contains("package"));
    CHECK(vm->quit() == 0);
}

TEST_CASE("vmm/qmp/limits") {
    TempDir dir;
    auto vm = VmProcess::start(dir, "vm", {"--workload", "idle"});
    INFO("vm log: " << vm->log_tail());
    {
        std::vector<QmpClient> clients;
        for (int i = 0; i < 16; ++i) {
            clients.push_back(vm->connect());
            REQUIRE(clients.back().execute("query-status").has_value());
        }
        auto extra = QmpClient::connect(vm->qmp, QmpClient::Handshake::none);
        REQUIRE(extra.has_value());
        auto line = extra->read_line(10s);
        REQUIRE(line.has_value());
        CHECK(json::parse(*line)["error"]["desc"] == "too many clients (at most 16)");
    }
    {
        auto c = vm->connect();
        REQUIRE(c.send_raw(std::string(70 * 1024, 'x')).has_value());
        auto line = c.read_line(10s);
        REQUIRE(line.has_value());
        CHECK(json::parse(*line)["error"]["desc"] == "request line longer than 65536 bytes");
        CHECK_FALSE(c.read_line(10s).has_value());  // and closed
    }
    CHECK(vm->execute("query-status")["status"] == "running");
    CHECK(vm->quit() == 0);
}

TEST_CASE("vmm/qmp/wrong-phase") {
    TempDir dir;
    // The destination holds its first bulk frame before placing it (fail point) until
    // the test writes to this pipe: the migration cannot complete before that.
    const std::string release = dir.file("release-bulk");
    REQUIRE(::mkfifo(release.c_str(), 0600) == 0);
    auto src = VmProcess::start(dir, "src", {"--workload", "idle"});
    auto dst = VmProcess::start(dir, "dst", {"--workload", "idle", "--incoming", "tcp:127.0.0.1:0",
                                             "--recover-timeout-ms", "1000"},
                                {"LAZYMIG_FAILPOINTS=pager_bulk_before_place=hold:" + release});
    INFO("src log: " << src->log_tail());
    INFO("dst log: " << dst->log_tail());
    REQUIRE(dst->incoming.starts_with("tcp:127.0.0.1:"));
    CHECK(dst->incoming != "tcp:127.0.0.1:0");

    // The destination has no guest state until the migration brings it.
    auto st = dst->execute("query-status");
    CHECK(st["status"] == "inmigrate");
    CHECK(st["incoming"] == dst->incoming);
    CHECK(error_desc(dst->call("migrate", {{"uri", "tcp:127.0.0.1:1"}})) == "this VM is the destination of an incoming migration");
    CHECK(error_desc(dst->call("stop")) == "the VM is waiting for an incoming migration");
    CHECK(error_desc(dst->call("cont")) == "the VM is waiting for an incoming migration");
    CHECK(error_desc(dst->call("check-workload")).starts_with("no guest state yet"));
    CHECK(dst->execute("query-migrate")["phase"] == "idle");

    // A migration whose bulk channel is held is still running when the second migrate comes.
    auto events = src->connect();  // negotiated clients receive every event
    auto dst_events = dst->connect();
    CHECK(src->execute("migrate", {{"uri", dst->incoming}, {"mode", "postcopy"}}).empty());
    auto resumed = events.wait_event("MIGRATION", [](const json& e) { return e["data"]["status"] == "postcopy-active"; }, 30s);
    REQUIRE_MESSAGE(resumed.has_value(), why(resumed));
    CHECK((*resumed)["data"] == json{{"status", "postcopy-active"}});  // QEMU's data, nothing else
    CHECK(error_desc(src->call("migrate", {{"uri", dst->incoming}})) == "a migration is already in progress");
    auto q = src->execute("query-migrate");
    CHECK(q["role"] == "source");
    CHECK(q["mode"] == "postcopy");
    CHECK(dst->execute("query-migrate")["pages"]["pushed"] == 0);  // the held frame: nothing pushed is placed

    // After the destination resumed, cancelling would lose the VM: refused. The source
    // is then lost the hard way; pages that never arrived are poisoned, and the checker
    // names one instead of the process dying of SIGBUS.
    CHECK(error_desc(src->call("migrate-cancel")).starts_with("migrate-cancel is refused during post-copy"));
    CHECK(src->execute("query-migrate")["phase"] == "postcopy");
    src->proc->kill();
    // The source is gone: let the destination's held frame go; it pauses, nobody calls
    // migrate-recover within --recover-timeout-ms, and it finds the rest missing.
    {
        const int w = ::open(release.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        REQUIRE_MESSAGE(w >= 0, "the destination does not hold the release pipe open");
        CHECK(::write(w, "x", 1) == 1);
        ::close(w);
    }
    auto dst_end = dst_events.wait_event("MIGRATION", [](const json& e) { return e["data"]["status"] == "failed"; }, 30s);
    REQUIRE_MESSAGE(dst_end.has_value(), why(dst_end));
    auto dq = dst->execute("query-migrate");
    CHECK(dq["phase"] == "failed");
    CHECK(dq["status"] == "failed");
    CHECK_MESSAGE(dq["error"].get<std::string>().find("pages never arrived") != std::string::npos, dq.dump());
    auto check = dst->execute("check-workload");
    CHECK(check["ok"] == false);
    CHECK(check["detail"].get<std::string>().find("never arrived (poisoned)") != std::string::npos);
    CHECK(dst->execute("query-status")["running"] == false);

    CHECK(dst->quit() == 0);
}

// The management socket is 0600 whatever the umask: under umask 000 no other user may
// connect (and quit the VM).
TEST_CASE("vmm/qmp/socket-mode-0600-under-umask-000") {
    TempDir dir;
    const mode_t old = ::umask(0);
    auto vm = VmProcess::start(dir, "vm", {"--workload", "idle"});
    ::umask(old);
    struct stat st{};
    REQUIRE(::stat(vm->qmp.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(vm->quit() == 0);
}

// A second VM given a live socket's path is refused and the first keeps its socket; a
// stale socket (nobody answers) is replaced.
TEST_CASE("vmm/qmp/live-socket-path-refused") {
    TempDir dir;
    auto first = VmProcess::start(dir, "vm", {"--workload", "idle"});
    auto second = Process::spawn({vmm_binary(), "run", "--memory", "16M", "--qmp", first->qmp, "--auth", "none"},
                                 dir.file("second.log"));
    const auto rc = second->wait(30s);
    REQUIRE(rc.has_value());
    CHECK(*rc != 0);
    std::ifstream log(dir.file("second.log"));
    const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    CHECK_MESSAGE(text.find("qmp socket " + first->qmp + " is in use by another running VM (it answered a connect); "
                            "choose another --qmp path") != std::string::npos, text);
    CHECK(first->execute("query-status")["status"] == "running");  // still reachable: not stolen
    CHECK(first->quit() == 0);
    // Now stale: a third VM replaces it.
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, first->qmp.c_str(), sizeof a.sun_path - 1);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);  // bound, never listening: stale
    ::close(fd);
    auto third = VmProcess::start(dir, "vm", {"--workload", "idle"});
    CHECK(third->execute("query-status")["status"] == "running");
    CHECK(third->quit() == 0);
}
