// vmm/recover: post-copy pause and recover between two lazymig-vmm processes, through
// QMP as an operator would: migrate-pause on the destination, migrate-recover on both
// (the destination on a new port), and the pattern workload — whose vCPUs kept
// faulting on missing pages during the pause — checks out after completion.
//
// The source's pusher is held at its first batch (fail point hold:FIFO) until the
// destination has paused, so the pause falls mid-transfer on every machine.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.hpp"

using namespace vmm;
using namespace vmm::test;
using namespace std::chrono_literals;

TEST_CASE("vmm/recover/migrate-pause-and-migrate-recover") {
    TempDir dir;
    const std::string release = dir.file("release-push");
    REQUIRE(::mkfifo(release.c_str(), 0600) == 0);
    // A slow guest: it must not fetch every page by demand before the pause.
    const std::vector<std::string> args{"--workload", "pattern", "--backing", "memfd", "--rate", "2000"};
    auto dargs = args;
    dargs.insert(dargs.end(), {"--incoming", "tcp:127.0.0.1:0"});
    auto dst = VmProcess::start(dir, "dst", dargs);
    auto src = VmProcess::start(dir, "src", args, {"LAZYMIG_FAILPOINTS=source_push_batch=hold:" + release});
    INFO("src log: " << src->log_tail());
    INFO("dst log: " << dst->log_tail());
    auto src_events = src->connect();
    auto dst_events = dst->connect();
    auto status_is = [](const char* s) { return [s](const json& e) { return e["data"]["status"] == s; }; };

    // Outside post-copy there is nothing to pause.
    auto early = src->call("migrate-pause");
    REQUIRE_MESSAGE(early.contains("error"), early.dump());
    CHECK(early["error"]["desc"] == "no migration in progress");

    src->execute("migrate", {{"uri", dst->incoming}});
    auto active = dst_events.wait_event("MIGRATION", status_is("postcopy-active"), 30s);
    REQUIRE_MESSAGE(active.has_value(), why(active));
    dst->execute("migrate-pause");
    auto dpaused = dst_events.wait_event("MIGRATION", status_is("postcopy-paused"), 30s);
    REQUIRE_MESSAGE(dpaused.has_value(), why(dpaused));
    {  // the held push batch goes on, meets the closed link: the source pauses too
        const int w = ::open(release.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        REQUIRE_MESSAGE(w >= 0, "the source does not hold the release pipe open");
        CHECK(::write(w, "x", 1) == 1);
        ::close(w);
    }
    auto spaused = src_events.wait_event("MIGRATION", status_is("postcopy-paused"), 30s);
    REQUIRE_MESSAGE(spaused.has_value(), why(spaused));
    const auto dq = dst->execute("query-migrate");
    CHECK(dq["status"] == "postcopy-paused");
    CHECK(dq["phase"] == "paused");
    CHECK(dq["pages"]["present"].get<std::uint64_t>() < dq["pages"]["total"].get<std::uint64_t>());
    CHECK(src->execute("query-migrate")["status"] == "postcopy-paused");

    const json bound = dst->execute("migrate-recover", {{"uri", "tcp:127.0.0.1:0"}});
    const std::string uri = bound["uri"];
    CHECK(uri != dst->incoming);
    src->execute("migrate-recover", {{"uri", uri}});
    for (auto* events : {&src_events, &dst_events}) {
        auto rec = events->wait_event("MIGRATION", status_is("postcopy-recover"), 30s);
        REQUIRE_MESSAGE(rec.has_value(), why(rec));
        auto done = events->wait_event("MIGRATION", status_is("completed"), 60s);
        REQUIRE_MESSAGE(done.has_value(), why(done));
    }
    const auto end = dst->execute("query-migrate");
    CHECK(end["recovery"]["pauses"] == 1);
    CHECK(end["recovery"]["recoveries"] == 1);
    CHECK(end["pages"]["present"] == end["pages"]["total"]);
    auto check = dst->execute("check-workload");
    CHECK_MESSAGE(check["ok"] == true, check["detail"]);
    CHECK(dst->execute("query-status")["status"] == "running");
    CHECK(src->quit() == 0);
    CHECK(dst->quit() == 0);
}

// --poison-on-loss: the source dies mid post-copy and nobody recovers within 1 s. The
// destination poisons only the pages that never arrived and does not stop the VM; a
// vCPU or the checker touching one reports a memory error, the process lives on.
TEST_CASE("vmm/recover/source-lost-with-poison-on-loss") {
    TempDir dir;
    const std::vector<std::string> args{"--workload", "pattern", "--backing", "memfd", "--rate", "2000"};
    auto dargs = args;
    dargs.insert(dargs.end(), {"--incoming", "tcp:127.0.0.1:0", "--poison-on-loss", "--recover-timeout-ms", "1000"});
    auto dst = VmProcess::start(dir, "dst", dargs);
    auto src = VmProcess::start(dir, "src", args, {"LAZYMIG_FAILPOINTS=source_push_batch=hold"});
    INFO("src log: " << src->log_tail());
    INFO("dst log: " << dst->log_tail());
    auto dst_events = dst->connect();
    auto status_is = [](const char* s) { return [s](const json& e) { return e["data"]["status"] == s; }; };
    src->execute("migrate", {{"uri", dst->incoming}});
    auto active = dst_events.wait_event("MIGRATION", status_is("postcopy-active"), 30s);
    REQUIRE_MESSAGE(active.has_value(), why(active));
    src->proc->kill();
    auto paused = dst_events.wait_event("MIGRATION", status_is("postcopy-paused"), 30s);
    REQUIRE_MESSAGE(paused.has_value(), why(paused));
    auto failed = dst_events.wait_event("MIGRATION", status_is("failed"), 30s);
    REQUIRE_MESSAGE(failed.has_value(), why(failed));
    const auto dq = dst->execute("query-migrate");
    CHECK(dq["recovery"]["vm-stopped"] == false);
    CHECK(dq["recovery"]["pages-poisoned"].get<std::uint64_t>() > 0);
    CHECK(dq["recovery"]["pages-poisoned"] == dq["recovery"]["pages-missing"]);
    CHECK_MESSAGE(dq["error"].get<std::string>().find("poisoned (poison_on_loss): the guest gets a memory error") !=
                      std::string::npos,
                  dq.dump());
    auto check = dst->execute("check-workload");
    CHECK(check["ok"] == false);
    CHECK_MESSAGE(check["detail"].get<std::string>().starts_with("memory error: page "), check.dump());
    CHECK(dst->quit() == 0);
}
