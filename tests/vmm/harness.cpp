#include "harness.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "tests/tls_key.hpp"

extern char** environ;

namespace vmm::test {

TempDir::TempDir() {
    char tmpl[] = "/tmp/lazymig-vmm-test.XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error(fmt::format("mkdtemp: {}", std::strerror(errno)));
    path_ = tmpl;
}

const std::string& TempDir::key_file() const {
    if (key_file_.empty()) {
        const std::string path = file("migration.key");
        if (!testkey::write_file(path)) throw std::runtime_error(fmt::format("writing {}", path));
        key_file_ = path;
    }
    return key_file_;
}

TempDir::~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
}

std::unique_ptr<Process> Process::spawn(const std::vector<std::string>& argv, const std::string& log_path,
                                        const std::vector<std::string>& extra_env) {
    int pipefd[2];
    if (::pipe2(pipefd, O_CLOEXEC) != 0) throw std::runtime_error(fmt::format("pipe2: {}", std::strerror(errno)));
    UniqueFd rd(pipefd[0]), wr(pipefd[1]);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, wr.get(), STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    // Through setpriv --pdeathsig where there is one: if this test process dies (a crash,
    // a meson timeout), the kernel kills its children instead of leaving them behind.
    std::vector<std::string> full;
    if (::access("/usr/bin/setpriv", X_OK) == 0) full = {"/usr/bin/setpriv", "--pdeathsig", "KILL", "--"};
    full.insert(full.end(), argv.begin(), argv.end());
    std::vector<char*> args;
    for (const auto& a : full) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    std::vector<std::string> env_store(extra_env);
    for (char** e = environ; *e; ++e) env_store.emplace_back(*e);
    std::vector<char*> env;
    for (auto& e : env_store) env.push_back(e.data());
    env.push_back(nullptr);
    std::unique_ptr<Process> p(new Process);
    const int rc = ::posix_spawn(&p->pid_, full[0].c_str(), &fa, &attr, args.data(), env.data());
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) throw std::runtime_error(fmt::format("posix_spawn {}: {}", argv[0], std::strerror(rc)));
    p->out_ = std::move(rd);
    p->pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, p->pid_, 0)));
    if (!p->pidfd_) throw std::runtime_error(fmt::format("pidfd_open: {}", std::strerror(errno)));
    return p;
}

Process::~Process() {
    if (!reaped_) {
        kill();
        [[maybe_unused]] auto s = wait(10s);
    }
}

void Process::kill() {
    if (reaped_ || pid_ <= 0) return;
    ::kill(-pid_, SIGKILL);  // the group this child leads: it and anything it started
}

std::optional<std::string> Process::read_line(Millis timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        if (auto nl = buf_.find('\n'); nl != std::string::npos) {
            std::string line = buf_.substr(0, nl);
            buf_.erase(0, nl + 1);
            return line;
        }
        const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0 || !out_) return std::nullopt;
        pollfd p{out_.get(), POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
        char b[4096];
        const ssize_t n = ::read(out_.get(), b, sizeof b);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            out_.reset();
            return std::nullopt;
        }
        buf_.append(b, static_cast<std::size_t>(n));
        seen_.append(b, static_cast<std::size_t>(n));
    }
}

std::string Process::read_all(Millis timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (out_) {
        const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) break;
        [[maybe_unused]] auto l = read_line(left);
    }
    return seen_;
}

std::optional<int> Process::wait(Millis timeout) {
    if (reaped_) return status_;
    pollfd p{pidfd_.get(), POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(timeout.count()));
    if (r <= 0) return std::nullopt;
    int st = 0;
    if (::waitpid(pid_, &st, 0) != pid_) return std::nullopt;
    reaped_ = true;
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return status_;
}

std::string tail(const std::string& path, std::size_t bytes) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    return s.size() > bytes ? "..." + s.substr(s.size() - bytes) : s;
}

std::string vmm_binary() {
    const char* p = std::getenv("LAZYMIG_VMM");
    return p ? p : "lazymig-vmm";
}

std::string source_root() {
    const char* p = std::getenv("LAZYMIG_ROOT");
    return p ? p : ".";
}

std::unique_ptr<VmProcess> VmProcess::start(const TempDir& dir, const std::string& name,
                                            const std::vector<std::string>& args, const std::vector<std::string>& env) {
    auto vm = std::make_unique<VmProcess>();
    vm->name = name;
    vm->qmp = dir.file(name + ".sock");
    vm->log = dir.file(name + ".log");
    std::vector<std::string> argv{vmm_binary(), "run", "--memory", "64M", "--vcpus", "2", "--qmp", vm->qmp};
    argv.insert(argv.end(), args.begin(), args.end());
    // Authentication is on by default: every VM of a test directory shares its key,
    // unless the test chose its own (--tls-psk-file, --tls-creds, --auth).
    const bool chose = std::ranges::any_of(args, [](const std::string& a) {
        return a == "--tls-psk-file" || a == "--tls-creds" || a == "--auth";
    });
    if (!chose) argv.insert(argv.end(), {"--tls-psk-file", dir.key_file()});
    vm->proc = Process::spawn(argv, vm->log, env);
    for (;;) {
        auto line = vm->proc->read_line(30s);
        INFO(name << " log: " << tail(vm->log));
        REQUIRE_MESSAGE(line.has_value(), name << ": no 'ready' line within 30 s");
        if (*line == "ready") break;
        if (line->starts_with("incoming: ")) vm->incoming = line->substr(10);
        if (line->starts_with("kv: tcp:127.0.0.1:")) vm->kv_port = std::stoi(line->substr(18));
    }
    return vm;
}

QmpClient VmProcess::connect() const {
    auto c = QmpClient::connect(qmp);
    REQUIRE_MESSAGE(c.has_value(), why(c));
    return std::move(*c);
}

json VmProcess::call(const std::string& cmd, const json& args) {
    if (!client_) client_ = connect();
    auto r = client_->call(cmd, args, 60s);
    INFO(name << " log: " << log_tail());
    REQUIRE_MESSAGE(r.has_value(), cmd << ": " << why(r));
    return *r;
}

json VmProcess::execute(const std::string& cmd, const json& args) {
    json r = call(cmd, args);
    INFO(name << " log: " << log_tail());
    REQUIRE_MESSAGE(r.contains("return"), cmd << " " << args.dump() << " → " << r.dump());
    return r["return"];
}

int VmProcess::quit() {
    execute("quit");
    client_.reset();
    return proc->wait(30s).value_or(-1);
}

}  // namespace vmm::test
