// qmp_server.hpp — the management socket: a unix stream socket speaking line-delimited
// JSON, one response line per request line, in the spirit of QEMU's QMP.
//
// One thread serves every client: it blocks in poll on the listening socket, the
// clients, the event bus and a stop eventfd, and runs each complete line through the
// handler in arrival order. Events (events.hpp) go to the clients that enabled them. Bounds: kMaxClients clients (more are told so and closed), kMaxLine
// bytes per request line (a longer one gets an error and the client is closed), and
// kMaxOutput bytes of unsent responses per client (a client that does not read is
// dropped). A client that leaves mid-line leaves nothing behind: half a line is never
// executed.
//
// Ownership: QmpServer owns the socket, its path (unlinked on stop) and the thread;
// stop() or the destructor signals, joins, and tries once more to flush responses.
#pragma once

#include <functional>
#include <memory>
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
        bool events = false;  // receives events (the `enable-events` command)
    };
    // One request line (without the newline) in, one response line (without it) out.
    using Handler = std::function<std::string(std::string_view, Session&)>;

    // Binds `path` (replacing a stale socket there) and starts the thread.
    [[nodiscard]] static lazymig::Result<std::unique_ptr<QmpServer>> start(std::string path, EventBus& events,
                                                                         Handler handler);
    ~QmpServer();
    QmpServer(const QmpServer&) = delete;
    QmpServer& operator=(const QmpServer&) = delete;
    void stop();

    // Composes an error response line, for handlers and for the server's own refusals.
    [[nodiscard]] static std::string error_line(std::string_view cls, std::string_view desc);

private:
    struct Client {
        UniqueFd fd;
        std::string in, out;
        Session session;
    };
    QmpServer(std::string path, EventBus& events, Handler handler)
        : path_(std::move(path)), events_(events), handler_(std::move(handler)) {}
    void deliver_events();
    void run();
    void accept_one();
    void read_from(Client& c);
    void flush(Client& c);

    std::string path_;
    EventBus& events_;
    Handler handler_;
    UniqueFd listen_;
    EventFd stop_;
    std::vector<Client> clients_{kMaxClients};  // the server thread's only
    std::thread thread_;
};

}  // namespace vmm
