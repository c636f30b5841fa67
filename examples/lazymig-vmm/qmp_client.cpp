#include "qmp_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace vmm {

lazymig::Result<QmpClient> QmpClient::connect(const std::string& path, Handshake handshake, Millis timeout) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path) return lazymig::logic_error(fmt::format("socket path '{}' too long", path));
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    QmpClient c;
    c.fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!c.fd_) return lazymig::sys_error("socket AF_UNIX");
    if (::connect(c.fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
        return lazymig::sys_error(fmt::format("connect {}", path));
    if (handshake == Handshake::none) return c;
    // The greeting comes first; a server that is full sends an error instead.
    auto hello = c.read_message(timeout, false);
    if (!hello) return std::unexpected(hello.error().wrap(fmt::format("QMP greeting from {}", path)));
    if (!hello->contains("QMP") || !(*hello)["QMP"].is_object())
        return lazymig::logic_error(fmt::format("{} sent no QMP greeting but: {}", path, hello->dump()));
    c.greeting_ = std::move(*hello);
    if (auto ok = c.execute("qmp_capabilities", nlohmann::json::object(), timeout); !ok)
        return std::unexpected(ok.error().wrap(fmt::format("capabilities negotiation with {}", path)));
    return c;
}

lazymig::Result<void> QmpClient::send_raw(std::string_view bytes) {
    while (!bytes.empty()) {
        const ssize_t n = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return lazymig::sys_error("send to management socket");
        }
        bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return {};
}

lazymig::Result<std::string> QmpClient::read_line(Millis timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        if (auto nl = in_.find('\n'); nl != std::string::npos) {
            std::string line = in_.substr(0, nl);
            in_.erase(0, nl + 1);
            return line;
        }
        const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0)
            return std::unexpected(lazymig::Error{ETIMEDOUT, fmt::format("nothing from the management socket within {} ms", timeout.count())});
        pollfd p{fd_.get(), POLLIN, 0};
        const int r = ::poll(&p, 1, static_cast<int>(left.count()));
        if (r < 0 && errno != EINTR) return lazymig::sys_error("poll management socket");
        if (r <= 0) continue;
        char buf[4096];
        const ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
        if (n == 0) return lazymig::logic_error("the management socket closed the connection");
        if (n < 0) {
            if (errno == EINTR) continue;
            return lazymig::sys_error("recv from management socket");
        }
        in_.append(buf, static_cast<std::size_t>(n));
    }
}

void QmpClient::keep_event(nlohmann::json e) {
    if (events_.size() == kMaxEvents) events_.pop_front();
    events_.push_back(std::move(e));
}

lazymig::Result<nlohmann::json> QmpClient::read_message(Millis timeout, bool want_event) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
        auto line = read_line(std::max(left, Millis{0}));
        if (!line) return std::unexpected(line.error());
        auto msg = nlohmann::json::parse(*line, nullptr, /*allow_exceptions=*/false);
        if (msg.is_discarded() || !msg.is_object())
            return lazymig::logic_error(fmt::format("the management socket sent something that is not a JSON object: {}", *line));
        if (msg.contains("event") && !want_event) {
            keep_event(std::move(msg));
            continue;
        }
        return msg;
    }
}

lazymig::Result<nlohmann::json> QmpClient::call(std::string_view cmd, const nlohmann::json& args, Millis timeout) {
    nlohmann::json req{{"execute", cmd}};
    if (!args.empty()) req["arguments"] = args;
    if (auto ok = send_raw(req.dump() + "\n"); !ok) return std::unexpected(ok.error());
    auto resp = read_message(timeout, false);
    if (!resp) return std::unexpected(resp.error().wrap(std::string(cmd)));
    return resp;
}

lazymig::Result<nlohmann::json> QmpClient::wait_event(std::string_view name,
                                                      const std::function<bool(const nlohmann::json&)>& match,
                                                      Millis timeout) {
    auto fits = [&](const nlohmann::json& e) { return e.value("event", "") == name && match(e); };
    while (!events_.empty()) {
        nlohmann::json e = std::move(events_.front());
        events_.pop_front();
        if (fits(e)) return e;
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
        auto msg = read_message(std::max(left, Millis{0}), true);
        if (!msg) return std::unexpected(msg.error().wrap(fmt::format("waiting for event {}", name)));
        if (!msg->contains("event"))
            return lazymig::logic_error(fmt::format("a response arrived while waiting for event {}: {}", name, msg->dump()));
        if (fits(*msg)) return msg;
    }
}

lazymig::Result<nlohmann::json> QmpClient::execute(std::string_view cmd, const nlohmann::json& args, Millis timeout) {
    auto resp = call(cmd, args, timeout);
    if (!resp) return resp;
    if (resp->contains("error"))
        return lazymig::logic_error(fmt::format("{}: {}", cmd, (*resp)["error"].value("desc", resp->dump())));
    if (!resp->contains("return")) return lazymig::logic_error(fmt::format("{}: response has no return: {}", cmd, resp->dump()));
    return (*resp)["return"];
}

}  // namespace vmm
