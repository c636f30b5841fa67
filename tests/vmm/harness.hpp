// harness.hpp — real lazymig-vmm processes for the tests: spawned with posix_spawn,
// stdout read through a pipe, stderr kept in a log file, every wait bounded.
//
//   TempDir dir;
//   auto src = VmProcess::start(dir, "src", {"--workload", "bank"});
//   auto dst = VmProcess::start(dir, "dst", {"--workload", "bank", "--incoming", "tcp:127.0.0.1:0"});
//   src->execute("migrate", {{"uri", dst->incoming}});
//
// The binary comes from $LAZYMIG_VMM (meson sets it). A Process still running when
// its owner is destroyed is killed (SIGKILL to the process group it leads) and reaped.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fd.hpp"
#include "qmp_client.hpp"

namespace vmm::test {

using namespace std::chrono_literals;
using Millis = std::chrono::milliseconds;
using json = nlohmann::json;

class TempDir {
public:
    TempDir();
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    [[nodiscard]] const std::string& path() const noexcept { return path_; }
    [[nodiscard]] std::string file(const std::string& name) const { return path_ + "/" + name; }
    // A migration key for the VMs of this directory (hex, mode 0600), made on first use.
    [[nodiscard]] const std::string& key_file() const;

private:
    std::string path_;
    mutable std::string key_file_;
};

class Process {
public:
    // argv[0] is the program path. stderr goes to `log_path`; stdout to a pipe.
    // The child leads a new process group, so kill() also reaches its children.
    [[nodiscard]] static std::unique_ptr<Process> spawn(const std::vector<std::string>& argv, const std::string& log_path,
                                                        const std::vector<std::string>& extra_env = {});
    ~Process();
    Process(const Process&) = delete;
    Process& operator=(const Process&) = delete;

    // The next stdout line, or nothing on EOF or when `timeout` passes.
    [[nodiscard]] std::optional<std::string> read_line(Millis timeout);
    // Reads stdout to EOF (bounded); returns all of it, including lines read before.
    [[nodiscard]] std::string read_all(Millis timeout);
    // The exit code (128 + signal if killed by one), or nothing if still running.
    [[nodiscard]] std::optional<int> wait(Millis timeout);
    void kill();
    [[nodiscard]] pid_t pid() const noexcept { return pid_; }
    [[nodiscard]] const std::string& output() const noexcept { return seen_; }

private:
    Process() = default;
    pid_t pid_ = -1;
    bool reaped_ = false;
    int status_ = 0;
    UniqueFd out_, pidfd_;
    std::string buf_, seen_;
};

// The error text of a Result, or "" when it holds a value: safe in assertion
// messages, which doctest may format even when the assertion passes.
template <class T>
[[nodiscard]] std::string why(const lazymig::Result<T>& r) {
    return r ? std::string() : r.error().message();
}

// The last `bytes` of a file (a VM's stderr log) for failure messages.
[[nodiscard]] std::string tail(const std::string& path, std::size_t bytes = 4000);
[[nodiscard]] std::string vmm_binary();
[[nodiscard]] std::string source_root();

struct VmProcess {
    std::unique_ptr<Process> proc;
    std::string name, qmp, log, incoming;
    int kv_port = 0;

    // `run --memory 64M --vcpus 2 --qmp DIR/NAME.sock` plus `args`, with `env`
    // ("NAME=value", e.g. LAZYMIG_FAILPOINTS) added; waits for "ready".
    [[nodiscard]] static std::unique_ptr<VmProcess> start(const TempDir& dir, const std::string& name,
                                                          const std::vector<std::string>& args,
                                                          const std::vector<std::string>& env = {});
    [[nodiscard]] QmpClient connect() const;
    // The "return" member; any error fails the test (REQUIRE).
    json execute(const std::string& cmd, const json& args = json::object());
    // The whole response object.
    json call(const std::string& cmd, const json& args = json::object());
    // Sends quit and returns the exit code (or -1 if it did not exit within the bound).
    int quit();
    [[nodiscard]] std::string log_tail() const { return tail(log); }

private:
    std::optional<QmpClient> client_;
};

}  // namespace vmm::test
