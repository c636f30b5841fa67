#include "qmp_server.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "log.hpp"
#include "qmp_json.hpp"

namespace vmm {

std::string QmpServer::error_line(std::string_view cls, std::string_view desc) {
    nlohmann::ordered_json error;
    error["class"] = cls;
    error["desc"] = desc;
    return qmp_message(nlohmann::ordered_json{{"error", std::move(error)}});
}

lazymig::Result<std::unique_ptr<QmpServer>> QmpServer::start(std::string path, EventBus& events, std::string greeting,
                                                             Handler handler) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof addr.sun_path)
        return lazymig::logic_error(fmt::format("qmp socket path '{}' is empty or longer than {} bytes", path,
                                                sizeof addr.sun_path - 1));
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    std::unique_ptr<QmpServer> s(new QmpServer(std::move(path), events, std::move(greeting), std::move(handler)));
    s->listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!s->listen_) return lazymig::sys_error("qmp: socket AF_UNIX");
    // A socket left by a previous run (no one answers a connect) is replaced; a live one
    // belongs to another VM and is refused; any other file there is not touched.
    struct stat st;
    if (::lstat(s->path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
        UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!probe) return lazymig::sys_error("qmp: socket AF_UNIX");
        if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0)
            return lazymig::logic_error(fmt::format("qmp socket {} is in use by another running VM (it answered a "
                                                    "connect); choose another --qmp path", s->path_));
        if (errno != ECONNREFUSED) return lazymig::sys_error(fmt::format("qmp: probing {}", s->path_));
        ::unlink(s->path_.c_str());
    }
    // Mode 0600 whatever the umask: whoever reaches the socket controls the VM. Bound
    // under umask 077, so it never exists with wider permissions; chmod/chown it (or
    // its directory) to grant others.
    const mode_t old_umask = ::umask(077);
    const int bound = ::bind(s->listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    const int bind_errno = errno;
    ::umask(old_umask);
    if (bound != 0) return lazymig::sys_error(fmt::format("qmp: bind {}", s->path_), bind_errno);
    if (::chmod(s->path_.c_str(), 0600) != 0) return lazymig::sys_error(fmt::format("qmp: chmod 0600 {}", s->path_));
    if (::listen(s->listen_.get(), 16) != 0) return lazymig::sys_error(fmt::format("qmp: listen {}", s->path_));
    auto stop = EventFd::create();
    if (!stop) return std::unexpected(stop.error().wrap("qmp"));
    s->stop_ = std::move(*stop);
    auto done = EventFd::create();
    if (!done) return std::unexpected(done.error().wrap("qmp"));
    s->job_done_ = std::move(*done);
    s->worker_ = std::thread([srv = s.get()] { srv->work(); });
    s->thread_ = std::thread([srv = s.get()] { srv->run(); });
    log_event("qmp_listening", "path={}", s->path_);
    return s;
}

QmpServer::~QmpServer() { stop(); }

void QmpServer::stop() {
    if (!thread_.joinable()) return;
    stop_.signal();
    thread_.join();
    {
        std::lock_guard lock(jobs_mu_);
        stopping_ = true;
        todo_.clear();  // deferred commands not begun are not run: the server is going away
    }
    jobs_cv_.notify_all();
    worker_.join();  // after the job it is running, if any
    collect_done();
    for (auto& c : clients_)
        if (c.fd) flush(c);  // a last try, e.g. the reply to `quit`
    clients_.clear();
    listen_.reset();
    ::unlink(path_.c_str());
    log_event("qmp_stopped", "path={}", path_);
}

void QmpServer::run() {
    std::vector<pollfd> fds;
    std::vector<Client*> owner;
    for (;;) {
        fds.assign({{stop_.fd(), POLLIN, 0}, {listen_.get(), POLLIN, 0}, {events_.fd(), POLLIN, 0},
                    {job_done_.fd(), POLLIN, 0}});
        owner.clear();
        for (auto& c : clients_) {
            if (!c.fd) continue;
            // A busy client's requests wait in the socket until its reply is out; its
            // hangup still shows (POLLHUP is reported whatever the events).
            const short in = c.busy ? 0 : POLLIN;
            fds.push_back({c.fd.get(), static_cast<short>(in | (c.out.empty() ? 0 : POLLOUT)), 0});
            owner.push_back(&c);
        }
        if (::poll(fds.data(), fds.size(), -1) < 0) {
            if (errno == EINTR) continue;
            log_event("qmp_error", "poll: {} (errno {})", std::strerror(errno), errno);
            return;
        }
        if (fds[0].revents) {
            deliver_events();  // e.g. the STOP a request before `quit` caused
            return;
        }
        // Events before requests: an event a command caused goes out before the reply
        // to the client's next command. Clients before the listener: slots freed by
        // clients that left are free for a newcomer that arrived in the same round.
        if (fds[2].revents) deliver_events();
        if (fds[3].revents) collect_done();
        for (std::size_t i = 4; i < fds.size(); ++i) {
            Client& c = *owner[i - 4];
            if (fds[i].revents & POLLOUT) flush(c);
            if (c.fd && (fds[i].revents & (POLLIN | POLLHUP | POLLERR))) read_from(c);
        }
        if (fds[1].revents) accept_one();
    }
}

void QmpServer::accept_one() {
    UniqueFd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
        if (errno != EAGAIN && errno != ECONNABORTED)
            log_event("qmp_error", "accept4: {} (errno {})", std::strerror(errno), errno);
        return;
    }
    for (auto& c : clients_) {
        if (c.fd) continue;
        c.fd = std::move(fd);
        c.in.clear();
        c.out = greeting_;  // QMP: the server speaks first
        c.session = {};
        c.generation = ++generations_;
        c.busy = false;
        flush(c);
        return;
    }
    const auto line = error_line("GenericError", fmt::format("too many clients (at most {})", kMaxClients));
    [[maybe_unused]] auto n = ::send(fd.get(), line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    log_event("qmp_client_refused", "reason=too-many-clients");
}

void QmpServer::read_from(Client& c) {
    char buf[4096];
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, 0);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n < 0 && errno != ECONNRESET)
            log_event("qmp_client_dropped", "reason=\"recv: {} (errno {})\"", std::strerror(errno), errno);
        // Gone, perhaps mid-line: whatever it sent without a newline is dropped.
        c.fd.reset();
        return;
    }
    c.in.append(buf, static_cast<std::size_t>(n));
    process(c);
}

// Runs the client's complete request lines in order, until one is deferred.
void QmpServer::process(Client& c) {
    std::size_t start = 0;
    for (auto nl = c.in.find('\n'); !c.busy && nl != std::string::npos; nl = c.in.find('\n', start)) {
        std::string_view line(c.in.data() + start, nl - start);
        start = nl + 1;
        if (line.size() > kMaxLine) {
            c.out += error_line("GenericError", fmt::format("request line longer than {} bytes", kMaxLine));
            continue;
        }
        if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
        c.out += handler_(line, c.session);
        if (c.session.deferred) {
            c.busy = true;
            {
                std::lock_guard lock(jobs_mu_);
                todo_.push_back({.slot = static_cast<std::size_t>(&c - clients_.data()), .generation = c.generation,
                                 .run = std::move(c.session.deferred), .response = {}});
            }
            c.session.deferred = nullptr;
            jobs_cv_.notify_one();
        }
    }
    c.in.erase(0, start);
    if (c.in.size() > kMaxLine && c.in.find('\n') == std::string::npos) {
        c.out += error_line("GenericError", fmt::format("request line longer than {} bytes", kMaxLine));
        flush(c);
        log_event("qmp_client_dropped", "reason=line-too-long");
        c.fd.reset();
        return;
    }
    flush(c);
}

// The worker: runs deferred commands one at a time, in the order they came.
void QmpServer::work() {
    std::unique_lock lock(jobs_mu_);
    for (;;) {
        jobs_cv_.wait(lock, [&] { return stopping_ || !todo_.empty(); });
        if (stopping_) return;
        Job job = std::move(todo_.front());
        todo_.pop_front();
        lock.unlock();
        job.response = job.run();
        job.run = nullptr;
        lock.lock();
        done_.push_back(std::move(job));
        job_done_.signal();
    }
}

// Server thread: hands finished responses to their clients (if still connected) and
// goes on with the requests they sent meanwhile.
void QmpServer::collect_done() {
    job_done_.drain();
    std::deque<Job> done;
    {
        std::lock_guard lock(jobs_mu_);
        done.swap(done_);
    }
    for (Job& job : done) {
        if (job.slot >= clients_.size()) continue;
        Client& c = clients_[job.slot];
        if (!c.fd || c.generation != job.generation) continue;  // it left meanwhile
        c.busy = false;
        c.out += job.response;
        process(c);
        flush(c);
    }
}

void QmpServer::deliver_events() {
    for (const auto& line : events_.drain())
        for (auto& c : clients_)
            if (c.fd && c.session.negotiated) c.out += line;
    for (auto& c : clients_)
        if (c.fd && !c.out.empty()) flush(c);
}

void QmpServer::flush(Client& c) {
    while (c.fd && !c.out.empty()) {
        const ssize_t n = ::send(c.fd.get(), c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) {
                if (errno != EPIPE && errno != ECONNRESET)
                    log_event("qmp_client_dropped", "reason=\"send: {} (errno {})\"", std::strerror(errno), errno);
                c.fd.reset();
            }
            break;
        }
        c.out.erase(0, static_cast<std::size_t>(n));
    }
    if (c.out.size() > kMaxOutput) {
        log_event("qmp_client_dropped", "reason=not-reading unsent={}", c.out.size());
        c.fd.reset();
    }
}

}  // namespace vmm
