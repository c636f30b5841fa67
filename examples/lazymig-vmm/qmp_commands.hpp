// qmp_commands.hpp — what the management socket understands, as QEMU's QMP:
//
//   ← {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "lazymig 0.1.0"}, "capabilities": []}}
//   → {"execute": "query-status"}
//   ← {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
//   → {"execute": "qmp_capabilities"}
//   ← {"return": {}}
//   → {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444", "mode": "postcopy"}, "id": 7}
//   ← {"return": {}, "id": 7}
//   ← {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 1700000000, "microseconds": 1}}
//
// The greeting's "qemu" triple is lazymig's version (QEMU's query-version format). Until
// qmp_capabilities (no capabilities are offered, so "enable" must be empty or absent)
// every command is refused with CommandNotFound as above; afterwards qmp_capabilities
// itself is. The "id" of a request, any JSON value, comes back in its response.
// Commands: migrate, query-migrate, migrate-set-parameters, query-migrate-parameters,
// migrate-cancel, stop, cont, query-status, query-version, check-workload,
// query-commands, qmp_capabilities, quit. Events (events.hpp) reach every negotiated
// client between responses.
// Error classes: CommandNotFound for an unknown command (and before negotiation),
// GenericError for the rest (bad JSON, missing or ill-typed arguments, a command in the
// wrong phase). handle() never throws.
//
// Commands run on the server thread, one at a time. check-workload reads all of guest
// RAM: on a destination still in post-copy that faults in every missing page, and
// other clients wait until it is done.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "qmp_server.hpp"

namespace vmm {

class Vm;
class Migration;

class QmpCommands {
public:
    QmpCommands(Vm& vm, Migration& migration, std::function<void()> quit)
        : vm_(vm), migration_(migration), quit_(std::move(quit)) {}

    // The message a new client is sent first.
    [[nodiscard]] static std::string greeting();
    // One request line (without its newline) in, one response message (CRLF) out.
    [[nodiscard]] std::string handle(std::string_view line, QmpServer::Session& session);

private:
    Vm& vm_;
    Migration& migration_;
    std::function<void()> quit_;
};

}  // namespace vmm
