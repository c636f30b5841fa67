// lazymig-uffd-handler — a page server for VMMs that hand their userfaultfd to another
// process (Firecracker's `mem_backend: {"backend_type": "Uffd"}`): it listens on a Unix
// socket, takes one handshake per connection (handshake.hpp) and serves that VM's faults
// with a lazymig Destination (session.hpp) from a snapshot file or a remote lazymig
// Source, one session at a time; a refused handshake is logged and the next connection
// is served. Stats on a QMP-style management socket (`query-uffd-handler`), and one
// summary line per session on stdout.
//
//   lazymig-uffd-handler --socket /run/fc.uffd --snapshot mem.snap [--mgmt /run/fc.mgmt]
//   lazymig-uffd-handler --socket /run/fc.uffd --listen tcp:0.0.0.0:4444
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <deque>
#include <mutex>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "events.hpp"
#include "log.hpp"
#include "qmp_commands.hpp"
#include "qmp_json.hpp"
#include "qmp_server.hpp"
#include "session.hpp"

namespace {

using namespace uffd_handler;
using json = nlohmann::json;

// What the management socket reports; written by the main thread, read by the server's.
class Board {
public:
    static constexpr std::size_t kMaxRefusals = 16;
    void publish(const lazymig::Destination* d, std::string uri) {
        std::lock_guard l(mu_);
        current_ = d;
        uri_ = std::move(uri);
    }
    void ended(const Summary& s) {
        std::lock_guard l(mu_);
        if (s.outcome == "refused") {
            ++refused_;
            refusals_.push_back(s.error);
            if (refusals_.size() > kMaxRefusals) refusals_.pop_front();
        } else {
            ++sessions_;
            last_ = s.to_json();
        }
    }
    json query() const {
        std::lock_guard l(mu_);
        json j{{"sessions", sessions_}, {"refused", refused_}, {"refusals", json(refusals_)}, {"last", last_}};
        j["current"] = current_ ? json{{"source_uri", uri_}, {"stats", stats_json(current_->stats())}} : json(nullptr);
        return j;
    }

private:
    mutable std::mutex mu_;
    const lazymig::Destination* current_ = nullptr;
    std::string uri_;
    unsigned sessions_ = 0, refused_ = 0;
    std::deque<std::string> refusals_;
    json last_;
};

// QMP as lazymig-vmm speaks it (qmp_server.hpp): negotiate, then query-uffd-handler or quit.
std::string handle_mgmt(std::string_view line, vmm::QmpServer::Session& session, Board& board, int quit_fd) {
    nlohmann::ordered_json out;
    auto error = [&](const char* cls, std::string desc) {
        out["error"] = {{"class", cls}, {"desc", std::move(desc)}};
        return vmm::qmp_message(out);
    };
    json req = json::parse(line, nullptr, false);
    if (!req.is_object() || !req.contains("execute") || !req["execute"].is_string())
        return error("GenericError", "QMP input must be a JSON object with a string member 'execute'");
    const std::string cmd = req["execute"];
    if (req.contains("id")) out["id"] = req["id"];
    if (!session.negotiated && cmd != "qmp_capabilities")
        return error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
    if (cmd == "qmp_capabilities") {
        if (session.negotiated) return error("CommandNotFound", "Capabilities negotiation is already complete, command ignored");
        session.negotiated = true;
        out["return"] = json::object();
    } else if (cmd == "query-uffd-handler") {
        out["return"] = board.query();
    } else if (cmd == "quit") {
        const std::uint64_t one = 1;
        (void)!::write(quit_fd, &one, sizeof one);
        out["return"] = json::object();
    } else {
        return error("CommandNotFound", fmt::format("The command {} has not been found", cmd));
    }
    return vmm::qmp_message(out);
}

lazymig::Result<vmm::UniqueFd> listen_unix(const std::string& path) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    if (path.size() >= sizeof a.sun_path) return lazymig::logic_error(fmt::format("socket path too long: {}", path));
    std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
    vmm::UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!s) return lazymig::sys_error("socket(AF_UNIX)");
    ::unlink(path.c_str());  // a stale socket of an earlier run
    if (::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return lazymig::sys_error("bind " + path);
    if (::listen(s.get(), 16) != 0) return lazymig::sys_error("listen " + path);
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"lazymig-uffd-handler: serves a VMM's userfaultfd (Firecracker's UFFD handler protocol) with lazymig"};
    std::string socket_path, snapshot, listen_uri, mgmt;
    unsigned prefetch = 16, timeout_ms = 5000, max_sessions = 0;
    app.add_option("--socket", socket_path, "Unix socket the VMM connects to (Firecracker's mem_backend backend_path)")->required();
    auto* snap = app.add_option("--snapshot", snapshot, "snapshot memory file the pages come from");
    auto* lis = app.add_option("--listen", listen_uri, "tcp:HOST:PORT where a remote lazymig Source connects (port 0 picks one)");
    snap->excludes(lis);
    app.add_option("--mgmt", mgmt, "QMP-style management socket (query-uffd-handler, quit)");
    app.add_option("--prefetch", prefetch, "most pages fetched around one fault")->check(CLI::Range(1, 1024));
    app.add_option("--handshake-timeout-ms", timeout_ms, "how long a connection may take to send its handshake");
    app.add_option("--sessions", max_sessions, "exit after this many sessions (0: serve until stopped)");
    std::string psk_file, creds, peer_name, auth;
    app.add_option("--tls-psk-file", psk_file, "--listen: the migration's pre-shared key (a 0600 file of hex, "
                                              "`openssl rand -hex 32`), the same as the remote Source's");
    app.add_option("--tls-creds", creds, "--listen: x509 credentials directory (ca-cert.pem, server-cert.pem, "
                                         "server-key.pem)");
    app.add_option("--tls-peer-name", peer_name, "--listen, x509: the name the Source's certificate must carry");
    app.add_option("--auth", auth, "--listen: 'none' to accept a Source without authentication (anyone who reaches "
                                   "the port can write the VM's memory)");
    CLI11_PARSE(app, argc, argv);
    if (!auth.empty() && auth != "none") {
        std::fprintf(stderr, "lazymig-uffd-handler: --auth takes only 'none' (keys: --tls-psk-file, --tls-creds)\n");
        return 2;
    }
    if (!psk_file.empty() + !creds.empty() + !auth.empty() > 1) {
        std::fprintf(stderr, "lazymig-uffd-handler: choose one of --tls-psk-file, --tls-creds and --auth none\n");
        return 2;
    }
    if (snapshot.empty() && listen_uri.empty()) {
        std::fprintf(stderr, "lazymig-uffd-handler: give --snapshot FILE or --listen tcp:HOST:PORT\n");
        return 2;
    }

    SourceSpec spec;
    spec.listen_uri = listen_uri;
    // --snapshot: the Source inside the handler gets a fresh key per session (session.cpp).
    if (!psk_file.empty()) spec.security = {.auth = lazymig::Auth::psk, .psk_file = psk_file};
    else if (!creds.empty()) spec.security = {.auth = lazymig::Auth::x509, .creds_dir = creds, .peer_name = peer_name};
    else if (auth == "none") spec.security = {.auth = lazymig::Auth::none};
    spec.parameters.prefetch_pages = prefetch;
    vmm::UniqueFd snap_fd;
    if (!snapshot.empty()) {
        snap_fd.reset(::open(snapshot.c_str(), O_RDONLY | O_CLOEXEC));
        struct stat st{};
        if (!snap_fd || ::fstat(snap_fd.get(), &st) != 0) {
            std::fprintf(stderr, "lazymig-uffd-handler: snapshot file %s: %s\n", snapshot.c_str(), std::strerror(errno));
            return 1;
        }
        spec.snapshot_fd = snap_fd.get();
        spec.snapshot_size = static_cast<std::uint64_t>(st.st_size);
    }

    // SIGINT/SIGTERM and `quit` end the handler: both are polled, never handled in a signal context.
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigprocmask(SIG_BLOCK, &sigs, nullptr);
    signal(SIGPIPE, SIG_IGN);
    vmm::UniqueFd sig_fd(::signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK));
    auto quit = vmm::EventFd::create();
    auto listener = listen_unix(socket_path);
    if (!sig_fd || !quit || !listener) {
        std::fprintf(stderr, "lazymig-uffd-handler: %s\n",
                     !sig_fd ? "signalfd failed" : !quit ? quit.error().message().c_str() : listener.error().message().c_str());
        return 1;
    }
    Board board;
    unsigned number = 0;
    auto bus = vmm::EventBus::create();
    if (!bus) return 1;
    std::unique_ptr<vmm::QmpServer> server;
    if (!mgmt.empty()) {
        auto s = vmm::QmpServer::start(mgmt, **bus, vmm::QmpCommands::greeting(),
                                       [&](std::string_view line, vmm::QmpServer::Session& ss) {
                                           return handle_mgmt(line, ss, board, quit->fd());
                                       });
        if (!s) {
            std::fprintf(stderr, "lazymig-uffd-handler: %s\n", s.error().message().c_str());
            return 1;
        }
        server = std::move(*s);
    }
    std::printf("lazymig-uffd-handler: listening on %s\n", socket_path.c_str());
    std::fflush(stdout);

    Live live{[&](const lazymig::Destination* d, std::string uri) {
        if (d) {
            std::printf("lazymig-uffd-handler: session %u serving on %s\n", number, uri.c_str());
            std::fflush(stdout);
        }
        board.publish(d, std::move(uri));
    }};
    for (;;) {
        pollfd fds[3] = {{listener->get(), POLLIN, 0}, {sig_fd.get(), POLLIN, 0}, {quit->fd(), POLLIN, 0}};
        if (::poll(fds, 3, -1) < 0) {
            if (errno == EINTR) continue;
            std::perror("lazymig-uffd-handler: poll");
            return 1;
        }
        if (fds[1].revents || fds[2].revents) break;
        vmm::UniqueFd conn(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (!conn) continue;  // the client left before accept: nothing to serve
        ++number;
        Summary sum;
        auto h = receive_handshake(conn.get(), std::chrono::milliseconds(timeout_ms));
        if (!h) {
            sum = Summary{.number = number, .outcome = "refused", .error = h.error().message()};
        } else {
            sum = serve(number, std::move(*h), spec, conn.get(), {quit->fd(), sig_fd.get()}, live);
        }
        board.ended(sum);
        std::printf("lazymig-uffd-handler: %s\n", sum.line().c_str());
        std::fflush(stdout);
        if (max_sessions && number >= max_sessions) break;
    }
    if (server) server->stop();
    ::unlink(socket_path.c_str());
    return 0;
}
