// A child process with its stdout on a pipe, read line by line with a deadline.
// The deadline is a failure detector for a hung peer, never a speed check.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>
#include "tests/tls_key.hpp"

extern char** environ;

namespace lazymig::test {

class Process {
public:
    // `env` entries ("NAME=value") are added to this process's environment for the child.
    explicit Process(std::vector<std::string> argv, std::vector<std::string> env = {}) {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return;
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, p[1], STDOUT_FILENO);
        std::vector<char*> args;
        for (auto& a : argv) args.push_back(a.data());
        args.push_back(nullptr);
        std::vector<char*> envp;
        for (auto& e : env) envp.push_back(e.data());
        for (char** e = environ; *e; ++e) envp.push_back(*e);
        envp.push_back(nullptr);
        if (posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), envp.data()) != 0) pid_ = -1;
        posix_spawn_file_actions_destroy(&fa);
        ::close(p[1]);
        out_ = p[0];
    }
    Process(const Process&) = delete;
    ~Process() {
        if (pid_ > 0 && !exited_) {
            ::kill(pid_, SIGKILL);
            int st;
            ::waitpid(pid_, &st, 0);
        }
        if (out_ >= 0) ::close(out_);
    }
    [[nodiscard]] bool started() const { return pid_ > 0; }
    [[nodiscard]] const std::string& output() const { return all_; }

    // The next line, or nullopt at EOF or after `timeout`.
    std::optional<std::string> line(std::chrono::seconds timeout = std::chrono::seconds(300)) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            if (auto nl = buf_.find('\n'); nl != std::string::npos) {
                std::string l = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                return l;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) return std::nullopt;
            pollfd pfd{out_, POLLIN, 0};
            if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) continue;
            char chunk[4096];
            const ssize_t n = ::read(out_, chunk, sizeof chunk);
            if (n <= 0) return std::nullopt;
            buf_.append(chunk, static_cast<std::size_t>(n));
            all_.append(chunk, static_cast<std::size_t>(n));
        }
    }
    // Reads lines until one starts with `prefix`; returns it.
    std::optional<std::string> until(const std::string& prefix, std::chrono::seconds timeout = std::chrono::seconds(300)) {
        while (auto l = line(timeout))
            if (l->rfind(prefix, 0) == 0) return l;
        return std::nullopt;
    }
    // Drains the output and waits for the exit code (-signal if killed). -1000 on timeout.
    int wait(std::chrono::seconds timeout = std::chrono::seconds(300)) {
        while (line(timeout)) {
        }
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        int st = 0;
        for (;;) {
            const pid_t r = ::waitpid(pid_, &st, WNOHANG);
            if (r == pid_) break;
            if (std::chrono::steady_clock::now() > deadline) return -1000;
            pollfd none{-1, 0, 0};
            ::poll(&none, 0, 10);  // EOF seen: the child is exiting; reap it shortly
        }
        exited_ = true;
        return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    }
    void kill(int sig) { ::kill(pid_, sig); }

private:
    pid_t pid_ = -1;
    int out_ = -1;
    bool exited_ = false;
    std::string buf_, all_;
};

// This test process's key in a 0600 file for the peers it spawns ("--psk-file", path);
// removed when the process exits.
inline const std::string& psk_file() {
    struct File {
        std::string path = "/tmp/lazymig-test-psk-" + std::to_string(::getpid());
        File() {
            if (!testkey::write_file(path)) std::abort();
        }
        ~File() { ::unlink(path.c_str()); }
    };
    static const File f;
    return f.path;
}

}  // namespace lazymig::test
