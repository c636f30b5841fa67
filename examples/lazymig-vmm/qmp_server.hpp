// qmp_server.hpp — the management socket: a unix stream socket speaking QEMU's QMP
// (docs/interop/qmp-spec): each client is sent the greeting at once, must negotiate
// capabilities (`qmp_capabilities`, see qmp_commands.hpp) before any other command, and
// then gets one response per request and every event. Server messages are CRLF-terminated
// (qmp_json.hpp). Requests are read one per line: unlike QEMU's streaming parser, a
// request must end with a newline (every QMP client library sends one).
//
// One thread serves every client: it blocks in poll on the listening socket, the
// clients, the event bus and a stop eventfd, and runs each complete line through the
// handler in arrival order. Events (events.hpp) go to the clients that have negotiated
// (QEMU delivers none in capabilities-negotiation mode). Bounds: kMaxClients clients (more are told so and closed), kMaxLine
// bytes per request line (a longer one gets an error and the client is closed), and
// kMaxOutput bytes of unsent responses per client (a client that does not read is
// dropped). A client that leaves mid-line leaves nothing behind: half a line is never
// executed.
//
// A command that takes long (check-workload reads all of guest RAM) never blocks the
// other clients: its handler sets Session::deferred and returns nothing; the server's
// worker thread runs it while the server goes on, and that client's later requests wait
// for its reply (QMP answers in order). One deferred command per client at a time, so
// the worker's queue holds at most kMaxClients jobs.
//
// Ownership: QmpServer owns the socket, its path (unlinked on stop) and both threads;
// stop() or the destructor signals, joins (the worker after the job it is running), and
// tries once more to flush responses.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "events.hpp"
#include "fd.hpp"
#include "lazymig/error.hpp"

namespace vmm {

class QmpServer {
public:
    static constexpr std::size_t kMaxClients = 16;
    static constexpr std::size_t kMaxLine = 64 * 1024;
    static constexpr std::size_t kMaxOutput = 1 << 20;
    // What the server keeps per client that a command may change.
    struct Session {
        bool negotiated = false;  // qmp_capabilities succeeded: commands run, events flow
        // Set by a handler whose command would block: run on the worker thread, its
        // result is the response. The handler then returns an empty string.
        std::function<std::string()> deferred;
    };
    // One request line (without the newline) in, one response message (CRLF-terminated,
    // qmp_message()) out.
    using Handler = std::function<std::string(std::string_view, Session&)>;

    // Binds `path` (replacing a stale socket there) and starts the thread. `greeting` is
    // the message every new client is sent first.
    [[nodiscard]] static lazymig::Result<std::unique_ptr<QmpServer>> start(std::string path, EventBus& events,
                                                                         std::string greeting, Handler handler);
    ~QmpServer();
    QmpServer(const QmpServer&) = delete;
    QmpServer& operator=(const QmpServer&) = delete;
    void stop();

    // Composes an error response message, for handlers and for the server's own refusals.
    [[nodiscard]] static std::string error_line(std::string_view cls, std::string_view desc);

private:
    struct Client {
        UniqueFd fd;
        std::string in, out;
        Session session;
        std::uint64_t generation = 0;  // which connection holds this slot
        bool busy = false;             // a deferred command of its runs on the worker
    };
    struct Job {  // a deferred command, then its response
        std::size_t slot = 0;
        std::uint64_t generation = 0;
        std::function<std::string()> run;
        std::string response;
    };
    QmpServer(std::string path, EventBus& events, std::string greeting, Handler handler)
        : path_(std::move(path)), events_(events), greeting_(std::move(greeting)), handler_(std::move(handler)) {}
    void deliver_events();
    void run();
    void accept_one();
    void read_from(Client& c);
    void process(Client& c);
    void flush(Client& c);
    void work();
    void collect_done();

    std::string path_;
    EventBus& events_;
    const std::string greeting_;
    Handler handler_;
    UniqueFd listen_;
    EventFd stop_;
    std::vector<Client> clients_{kMaxClients};  // the server thread's only
    std::uint64_t generations_ = 0;
    std::mutex jobs_mu_;
    std::condition_variable jobs_cv_;
    std::deque<Job> todo_, done_;  // each at most kMaxClients: one job per client
    bool stopping_ = false;        // under jobs_mu_
    EventFd job_done_;
    std::thread thread_, worker_;
};

}  // namespace vmm
