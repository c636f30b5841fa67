// qmp_client.hpp — the client side of the management socket, for `lazymig-vmm migrate`,
// `lazymig-vmm qmp` and the tests. connect() reads the server's QMP greeting and
// negotiates capabilities (qmp_capabilities) before it returns, as every QMP client
// must. Every wait is bounded by a timeout. Event lines that arrive while a response is
// awaited are kept (the newest kMaxEvents) for wait_event().
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "fd.hpp"
#include "lazymig/error.hpp"

namespace vmm {

class QmpClient {
public:
    using Millis = std::chrono::milliseconds;

    enum class Handshake { negotiate, none };
    // Connects; with Handshake::negotiate also reads the greeting (greeting()) and runs
    // qmp_capabilities, within `timeout`. Handshake::none leaves both to the caller
    // (tests of the handshake itself).
    [[nodiscard]] static lazymig::Result<QmpClient> connect(const std::string& path,
                                                            Handshake handshake = Handshake::negotiate,
                                                            Millis timeout = Millis{30'000});
    // The server's greeting ({"QMP": ...}), once connect() negotiated.
    [[nodiscard]] const nlohmann::json& greeting() const noexcept { return greeting_; }

    // Sends {"execute": cmd, "arguments": args} and returns the response object
    // (holding "return" or "error").
    [[nodiscard]] lazymig::Result<nlohmann::json> call(std::string_view cmd,
                                                       const nlohmann::json& args = nlohmann::json::object(),
                                                       Millis timeout = Millis{60'000});
    // Like call(), but an {"error": ...} response becomes an Error carrying its desc.
    [[nodiscard]] lazymig::Result<nlohmann::json> execute(std::string_view cmd,
                                                          const nlohmann::json& args = nlohmann::json::object(),
                                                          Millis timeout = Millis{60'000});

    // Waits end with an Error whose code is ETIMEDOUT when the time is up.
    // Returns the first event named `name` for which `match` holds, received earlier
    // or within `timeout`; events before it are consumed.
    [[nodiscard]] lazymig::Result<nlohmann::json> wait_event(
        std::string_view name, const std::function<bool(const nlohmann::json&)>& match, Millis timeout);

    // Raw access, for tests of malformed input.
    [[nodiscard]] lazymig::Result<void> send_raw(std::string_view bytes);
    [[nodiscard]] lazymig::Result<std::string> read_line(Millis timeout);
    void close() { fd_.reset(); }

    static constexpr std::size_t kMaxEvents = 256;

private:
    // The next response line, keeping event lines aside.
    [[nodiscard]] lazymig::Result<nlohmann::json> read_message(Millis timeout, bool want_event);
    void keep_event(nlohmann::json e);

    UniqueFd fd_;
    std::string in_;
    std::deque<nlohmann::json> events_;  // <= kMaxEvents
    nlohmann::json greeting_;
};

}  // namespace vmm
