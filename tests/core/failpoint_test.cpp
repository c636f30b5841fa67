// The fail point registry and the LAZYMIG_FAILPOINTS spec a child process is armed with.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <future>
#include <string>

#include "src/failpoint.hpp"

namespace fp = lazymig::failpoint;

namespace {
struct DisarmOnExit {
    ~DisarmOnExit() { fp::disarm_all(); }
};
}  // namespace

TEST_CASE("failpoint/unarmed-points-pass") {
    DisarmOnExit d;
    CHECK(fp::check("source_push_batch", 0, 0, 1) == 0);
    fp::arm("source_push_batch", [](const fp::Site& s) { return s.first == 7 ? EIO : 0; });
    CHECK(fp::check("source_push_batch", 0, 6, 1) == 0);
    CHECK(fp::check("source_push_batch", 0, 7, 1) == EIO);
    CHECK(fp::check("source_serve_request", 0, 7, 1) == 0);
    fp::disarm_all();
    CHECK(fp::check("source_push_batch", 0, 7, 1) == 0);
}

TEST_CASE("failpoint/spec-error-action") {
    DisarmOnExit d;
    REQUIRE(fp::arm_spec("source_push_batch=error:5;source_serve_request=error:104") == "");
    CHECK(fp::check("source_push_batch", 0, 0, 1) == 5);
    CHECK(fp::check("source_serve_request", 0, 0, 1) == 104);
    CHECK(fp::check("pager_bulk_before_place", 0, 0, 1) == 0);
}

TEST_CASE("failpoint/spec-refused-whole-with-the-reason") {
    DisarmOnExit d;
    CHECK(fp::arm_spec("source_push_batch") == "'source_push_batch' is not name=action");
    CHECK(fp::arm_spec("a=error:x") == "a: error:E needs an errno number, got 'x'");
    CHECK(fp::arm_spec("a=error:5;b=sideways") == "b: unknown action 'sideways' (error:E, hold, hold:FIFO, kill, kill:N)");
    CHECK(fp::arm_spec("a=kill:0") == "a: kill:N needs a hit number from 1, got '0'");
    CHECK(fp::arm_spec("a=kill:x") == "a: kill:N needs a hit number from 1, got 'x'");
    CHECK(fp::arm_spec("a=hold:/nonexistent/fifo") == "a: hold:/nonexistent/fifo: cannot open the pipe (errno 2)");
    CHECK(fp::check("a", 0, 0, 1) == 0);  // nothing of a refused spec was armed
}

TEST_CASE("failpoint/hold-until-the-pipe-is-written") {
    DisarmOnExit d;
    char dir[] = "/tmp/lazymig-fp-XXXXXX";
    REQUIRE(::mkdtemp(dir) != nullptr);
    const std::string fifo = std::string(dir) + "/release";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    REQUIRE(fp::arm_spec("source_push_batch=hold:" + fifo) == "");
    auto held = std::async(std::launch::async, [] { return fp::check("source_push_batch", 0, 0, 1); });
    // Not a timing assertion: the hold cannot end before the pipe is written below.
    CHECK(held.wait_for(std::chrono::milliseconds(100)) == std::future_status::timeout);
    const int w = ::open(fifo.c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(w >= 0);
    REQUIRE(::write(w, "x", 1) == 1);
    REQUIRE(held.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
    CHECK(held.get() == 0);
    CHECK(fp::check("source_push_batch", 0, 1, 1) == 0);  // open from now on
    ::close(w);
    fp::disarm_all();
    ::unlink(fifo.c_str());
    ::rmdir(dir);
}

// kill:N: the hits before the N-th pass; the N-th takes the process down with SIGKILL
// (a child here, which reports each hit it came back from through a pipe).
TEST_CASE("failpoint/kill-on-the-nth-hit") {
    int p[2];
    REQUIRE(::pipe(p) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        ::close(p[0]);
        if (!fp::arm_spec("source_push_batch=kill:3").empty()) ::_exit(2);
        for (int i = 0; i < 10; ++i) {
            if (fp::check("source_push_batch", 0, std::uint64_t(i), 1) != 0) ::_exit(3);
            if (::write(p[1], "h", 1) != 1) ::_exit(4);
        }
        ::_exit(0);  // not reached when the kill works
    }
    ::close(p[1]);
    std::string seen;
    char buf[16];
    for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) > 0;) seen.append(buf, std::size_t(n));
    ::close(p[0]);
    int st = 0;
    REQUIRE(::waitpid(child, &st, 0) == child);
    CHECK(WIFSIGNALED(st));
    CHECK(WTERMSIG(st) == SIGKILL);
    CHECK(seen == "hh");  // hits 1 and 2 passed; hit 3 never returned
}

TEST_CASE("failpoint/kill-without-a-number-is-the-first-hit") {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        if (!fp::arm_spec("source_precopy_round=kill").empty()) ::_exit(2);
        (void)fp::check("source_precopy_round", 0, 1, 0);
        ::_exit(0);
    }
    int st = 0;
    REQUIRE(::waitpid(child, &st, 0) == child);
    CHECK(WIFSIGNALED(st));
    CHECK(WTERMSIG(st) == SIGKILL);
}
