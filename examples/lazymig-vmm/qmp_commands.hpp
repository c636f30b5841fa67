// qmp_commands.hpp — what the management socket understands.
//
//   → {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444", "mode": "postcopy"}, "id": 7}
//   ← {"return": {}, "id": 7}
//   ← {"error": {"class": "GenericError", "desc": "a migration is already in progress"}, "id": 7}
//
// Commands: migrate, query-migrate, migrate-set-parameters, query-migrate-parameters,
// migrate-cancel, stop, cont, query-status, check-workload, enable-events,
// query-commands, quit. After enable-events the client also receives event lines
// ({"event": ...}) between responses; see events.hpp.
// Error classes: CommandNotFound for an unknown command, GenericError for the rest
// (bad JSON, missing or ill-typed arguments, a command in the wrong phase). handle()
// never throws.
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

    // One request line in, one response line out (without newlines).
    [[nodiscard]] std::string handle(std::string_view line, QmpServer::Session& session);

private:
    Vm& vm_;
    Migration& migration_;
    std::function<void()> quit_;
};

}  // namespace vmm
