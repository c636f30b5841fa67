// qmp_json.hpp — JSON text as QEMU's monitor writes it, so that a client written
// against QEMU's documentation sees the same bytes from lazymig-vmm:
//
//   {"return": {}, "id": 7}\r\n
//
// Members in insertion order (build messages with nlohmann::ordered_json: "return"
// before "id", "event" before "data" before "timestamp"), ": " after a key, ", "
// between members and elements, ASCII only (other characters as \uXXXX escapes), and
// every message ends with CRLF (qmp-spec: "All interactions transmitted by the Server
// are json-objects, always terminating with CRLF").
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace vmm {

template <class Json>
void qmp_append(std::string& out, const Json& j) {
    if (j.is_object()) {
        out += '{';
        bool first = true;
        for (auto it = j.begin(); it != j.end(); ++it) {
            if (!first) out += ", ";
            first = false;
            out += Json(it.key()).dump(-1, ' ', true, Json::error_handler_t::replace);
            out += ": ";
            qmp_append(out, it.value());
        }
        out += '}';
    } else if (j.is_array()) {
        out += '[';
        bool first = true;
        for (const auto& e : j) {
            if (!first) out += ", ";
            first = false;
            qmp_append(out, e);
        }
        out += ']';
    } else {
        out += j.dump(-1, ' ', /*ensure_ascii=*/true, Json::error_handler_t::replace);
    }
}

// One message, CRLF-terminated.
template <class Json>
[[nodiscard]] std::string qmp_message(const Json& j) {
    std::string out;
    qmp_append(out, j);
    out += "\r\n";
    return out;
}

}  // namespace vmm
