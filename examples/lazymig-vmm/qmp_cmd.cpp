// `lazymig-vmm qmp`: one management-socket command from a shell.
//   lazymig-vmm qmp --socket /tmp/dst.sock check-workload
//   lazymig-vmm qmp --socket /tmp/src.sock migrate '{"uri": "tcp:127.0.0.1:4444"}'
// Prints the "return" value as JSON; an error goes to stderr and exits 1.
#include <fmt/format.h>

#include "options.hpp"
#include "qmp_client.hpp"

namespace vmm {

int run_qmp(const QmpOptions& o) {
    auto args = nlohmann::json::object();
    if (!o.arguments.empty()) {
        args = nlohmann::json::parse(o.arguments, nullptr, /*allow_exceptions=*/false);
        if (args.is_discarded() || !args.is_object())
            return fmt::print(stderr, "lazymig-vmm qmp: arguments must be a JSON object: {}\n", o.arguments), 2;
    }
    auto c = QmpClient::connect(o.socket);
    if (!c) return fmt::print(stderr, "lazymig-vmm qmp: {}\n", c.error().message()), 1;
    auto r = c->execute(o.command, args, std::chrono::milliseconds(static_cast<long>(o.timeout_s * 1000)));
    if (!r) return fmt::print(stderr, "lazymig-vmm qmp: {}\n", r.error().message()), 1;
    fmt::print("{}\n", r->dump());
    return 0;
}

}  // namespace vmm
