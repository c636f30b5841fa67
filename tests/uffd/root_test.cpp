// tests/uffd/root_test.cpp — what needs root: the ways to open a userfaultfd once
// privileges are dropped, and the FORK event (CAP_SYS_PTRACE). Linked with root_main,
// which exits 77 (skipped) for any other user.
//
// The fallback cases run in a forked child that drops privileges (CAP_SYS_PTRACE, then
// root itself, then the userfaultfd syscall via seccomp) and reports over a pipe.
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <cstddef>
#include <filesystem>
#include <fstream>

#include "helpers.hpp"

using namespace uffd_test;

namespace {

// Runs `body` in a child process and returns what it printed; the child exits at once.
std::string in_child(const std::function<std::string()>& body) {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        const std::string out = body();
        (void)!::write(p[1], out.data(), out.size());
        ::_exit(0);
    }
    ::close(p[1]);
    std::string out;
    char buf[512];
    for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
    ::close(p[0]);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    return out;
}

bool drop_cap(int cap) {
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (::syscall(SYS_capget, &hdr, data) != 0) return false;
    data[CAP_TO_INDEX(cap)].effective &= ~CAP_TO_MASK(cap);
    data[CAP_TO_INDEX(cap)].permitted &= ~CAP_TO_MASK(cap);
    return ::syscall(SYS_capset, &hdr, data) == 0;
}

bool become_nobody() { return ::setgroups(0, nullptr) == 0 && ::setgid(65534) == 0 && ::setuid(65534) == 0; }

// Makes every userfaultfd(2) call fail with EPERM, as a container runtime's profile would.
bool forbid_userfaultfd_syscall() {
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
    return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
           ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

std::string probe_text() {
    auto f = Uffd::probe();
    if (!f) return "error: " + f.error().message();
    return std::string("dev=") + (f->opened_via_dev ? "1" : "0") +
           " user_mode_only=" + (f->user_mode_only ? "1" : "0");
}

int unprivileged_sysctl() {
    int v = -1;
    std::ifstream("/proc/sys/vm/unprivileged_userfaultfd") >> v;
    return v;
}


}  // namespace

TEST_CASE("uffd/probe/root-opens-by-the-syscall") {
    auto f = Uffd::probe();
    REQUIRE_MESSAGE(f.has_value(), err_of(f));
    CHECK_FALSE(f->opened_via_dev);
    CHECK_FALSE(f->user_mode_only);
}

TEST_CASE("uffd/open/falls-back-to-dev-userfaultfd-without-cap-sys-ptrace") {
    const bool sysctl_allows = unprivileged_sysctl() == 1;
    const std::string out = in_child([] {
        if (!drop_cap(CAP_SYS_PTRACE)) return std::string("capset failed");
        auto fork_uffd = Uffd::open(UFFD_FEATURE_EVENT_FORK);
        return probe_text() + "; " + (fork_uffd ? "fork opened" : fork_uffd.error().message());
    });
    CHECK(out == std::string(sysctl_allows ? "dev=0" : "dev=1") +
                     " user_mode_only=0; UFFDIO_API api=0xaa features=0x2 (EVENT_FORK): "
                     "EVENT_FORK needs CAP_SYS_PTRACE: Operation not permitted (errno 1)");
}

TEST_CASE("uffd/open/falls-back-to-user-mode-only-when-unprivileged") {
    const bool sysctl_allows = unprivileged_sysctl() == 1;
    const std::string out = in_child([] {
        if (!become_nobody()) return std::string("setuid failed");
        auto u = Uffd::open(UFFD_FEATURE_MISSING_SHMEM);
        return probe_text() + "; " + (u ? "opened" : u.error().message());
    });
    CHECK(out == std::string("dev=0 user_mode_only=") + (sysctl_allows ? "0" : "1") + "; opened");
}

TEST_CASE("uffd/open/says-how-to-grant-access-when-every-way-is-refused") {
    const std::string out = in_child([] {
        if (!forbid_userfaultfd_syscall() || !become_nobody()) return std::string("setup failed");
        return probe_text();
    });
    CHECK(out ==
          "error: userfaultfd: every way to open one was refused ("
          "userfaultfd(O_CLOEXEC|O_NONBLOCK): EPERM (errno 1); "
          "open(/dev/userfaultfd, O_RDWR): EACCES (errno 13); "
          "userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY): EPERM (errno 1)); "
          "to allow it, run `sysctl vm.unprivileged_userfaultfd=1`, or give this user read-write "
          "access to /dev/userfaultfd (e.g. a group or an ACL), or grant CAP_SYS_PTRACE: "
          "Operation not permitted (errno 1)");
}

TEST_CASE("uffd/events/fork-yields-the-childs-uffd") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_registered(UFFD_FEATURE_EVENT_FORK, area);

    Workers w(u);
    int status = -1;
    pid_t child = -1;
    w.spawn([&] {
        child = ::fork();  // returns in the parent once the fork event was read
        if (child == 0) ::_exit(0);
        if (child > 0) ::waitpid(child, &status, 0);
    });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->kind == Event::Kind::fork);
    REQUIRE(ev->fork_fd >= 0);
    CHECK(ev->fork_fd != u.fd());
    std::error_code ec;
    const auto target = std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(ev->fork_fd), ec);
    CHECK(target.string() == "anon_inode:[userfaultfd]");
    CHECK(::close(ev->fork_fd) == 0);
    REQUIRE(w.wait_all());
    REQUIRE(child > 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}
