#include "qmp_commands.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <expected>
#include <map>
#include <set>

#include <fmt/format.h>

#include "lazymig/version.h"
#include "log.hpp"
#include "migration.hpp"
#include "qmp_json.hpp"
#include "vm.hpp"

namespace vmm {

namespace {
using json = nlohmann::json;

struct QmpError {
    std::string cls, desc;
};
using Reply = std::expected<json, QmpError>;

std::unexpected<QmpError> generic(std::string desc) { return std::unexpected(QmpError{"GenericError", std::move(desc)}); }

// Typed access to "arguments" that remembers which members were read, so that an
// unexpected member is refused instead of ignored.
class Args {
public:
    explicit Args(const json& j) : j_(j) {}
    std::expected<std::string, QmpError> str(const std::string& name) {
        seen_.insert(name);
        if (!j_.contains(name)) return generic(fmt::format("missing argument '{}'", name));
        if (!j_[name].is_string()) return generic(fmt::format("argument '{}' must be a string", name));
        return j_[name].get<std::string>();
    }
    std::expected<std::optional<std::string>, QmpError> opt_str(const std::string& name) {
        if (!j_.contains(name)) return std::nullopt;
        return str(name);
    }
    std::expected<std::optional<std::uint64_t>, QmpError> opt_uint(const std::string& name, std::uint64_t max) {
        seen_.insert(name);
        if (!j_.contains(name)) return std::nullopt;
        const json& v = j_[name];
        if (!v.is_number_unsigned() || v.get<std::uint64_t>() > max)
            return generic(fmt::format("argument '{}' must be an integer in 0..{}", name, max));
        return v.get<std::uint64_t>();
    }
    std::expected<void, QmpError> done() const {
        for (const auto& [k, v] : j_.items())
            if (!seen_.contains(k)) return generic(fmt::format("unexpected argument '{}'", k));
        return {};
    }

private:
    const json& j_;
    std::set<std::string> seen_;
};

Reply from(lazymig::Result<void> r, json ok = json::object()) {
    if (!r) return generic(r.error().message());
    return ok;
}
}  // namespace

std::string QmpCommands::greeting() {
    nlohmann::ordered_json qemu;  // QEMU's member order: micro, minor, major
    qemu["micro"] = LAZYMIG_VERSION_MICRO;
    qemu["minor"] = LAZYMIG_VERSION_MINOR;
    qemu["major"] = LAZYMIG_VERSION_MAJOR;
    nlohmann::ordered_json version;
    version["qemu"] = std::move(qemu);
    version["package"] = "lazymig " LAZYMIG_VERSION_STRING;
    nlohmann::ordered_json qmp;
    qmp["version"] = std::move(version);
    qmp["capabilities"] = nlohmann::ordered_json::array();  // no "oob": one command at a time
    return qmp_message(nlohmann::ordered_json{{"QMP", std::move(qmp)}});
}

namespace {
// QEMU's wording for a request it cannot parse: "JSON parse error, expecting value"
// where a value was expected, else the parser's own sentence.
std::string parse_error_desc(const json::parse_error& e) {
    const std::string what = e.what();
    if (what.find("while parsing value") != std::string::npos) return "JSON parse error, expecting value";
    const auto msg = what.find("] ");
    return "JSON parse error, " + (msg == std::string::npos ? what : what.substr(msg + 2));
}
}  // namespace

namespace {
// Test hook (tests/vmm/qmp.cpp): with LAZYMIG_VMM_HOLD_CHECK=FIFO a deferred command waits,
// at most 60 s, for a byte on that named pipe, so a test can show that other clients are
// answered while it runs, without depending on how long a check takes.
void hold_for_test() {
    const char* fifo = std::getenv("LAZYMIG_VMM_HOLD_CHECK");
    if (!fifo) return;
    const int fd = ::open(fifo, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return log_event("qmp_hold_error", "open {}: {} (errno {})", fifo, std::strerror(errno), errno);
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 60'000) <= 0) log_event("qmp_hold_error", "no byte on {} within 60 s", fifo);
    char b;
    [[maybe_unused]] auto n = ::read(fd, &b, 1);
    ::close(fd);
}

// One response message: `return` or `error`, and the request's id as it was sent.
std::string response(const Reply& r, const json& id) {
    nlohmann::ordered_json out;
    if (r) {
        out["return"] = *r;
    } else {
        nlohmann::ordered_json error;
        error["class"] = r.error().cls;
        error["desc"] = r.error().desc;
        out["error"] = std::move(error);
    }
    if (!id.is_null()) out["id"] = id;
    return qmp_message(out);
}
}  // namespace

std::string QmpCommands::handle(std::string_view line, QmpServer::Session& session) {
    json req;
    json id;
    auto respond = [&](const Reply& r) { return response(r, id); };
    try {
        req = json::parse(line);
    } catch (const json::parse_error& e) {
        return respond(generic(parse_error_desc(e)));
    }
    // QEMU's sentences for a malformed request (qapi/qmp-dispatch.c).
    if (!req.is_object()) return respond(generic("QMP input must be a JSON object"));
    if (req.contains("id")) id = req["id"];
    for (const auto& [k, v] : req.items())
        if (k != "execute" && k != "arguments" && k != "id")
            return respond(generic(fmt::format("QMP input member '{}' is unexpected", k)));
    if (!req.contains("execute")) return respond(generic("QMP input lacks member 'execute'"));
    if (!req["execute"].is_string()) return respond(generic("QMP input member 'execute' must be a string"));
    const json args_json = req.value("arguments", json::object());
    if (!args_json.is_object()) return respond(generic("QMP input member 'arguments' must be an object"));
    const std::string cmd = req["execute"];
    Args args(args_json);

    // Capabilities negotiation (qmp-spec): until qmp_capabilities succeeds no other
    // command runs, and every one is refused as QEMU refuses it.
    if (!session.negotiated) {
        if (cmd != "qmp_capabilities")
            return respond(std::unexpected(QmpError{"CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"}));
        if (args_json.contains("enable")) {
            const json& enable = args_json["enable"];
            if (!enable.is_array()) return respond(generic("Invalid parameter type for 'enable', expected: array"));
            if (!enable.empty()) {  // the greeting offers no capability, so any is refused
                if (!enable.front().is_string())
                    return respond(generic("Invalid parameter type for 'enable', expected: array of strings"));
                return respond(generic(fmt::format("Capability {} not available", enable.front().get<std::string>())));
            }
        }
        for (const auto& [k, v] : args_json.items())
            if (k != "enable") return respond(generic(fmt::format("Parameter '{}' is unexpected", k)));
        session.negotiated = true;
        return respond(json::object());
    }
    if (cmd == "qmp_capabilities")
        return respond(std::unexpected(QmpError{"CommandNotFound", "Capabilities negotiation is already complete, command ignored"}));

    using Handler = std::function<Reply(Args&)>;
    const std::map<std::string, Handler> table{
        {"migrate", [&](Args& a) -> Reply {
             auto uri = a.str("uri");
             auto mode = a.opt_str("mode");
             if (!uri) return std::unexpected(uri.error());
             if (!mode) return std::unexpected(mode.error());
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             auto m = lazymig::parse_mode(mode->value_or("postcopy"));
             if (!m) return generic(m.error().message());
             return from(migration_.migrate(*uri, *m));
         }},
        {"query-migrate", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return migration_.query();
         }},
        {"migrate-set-parameters", [&](Args& a) -> Reply {
             auto bw = a.opt_uint("max-bandwidth", UINT64_MAX);
             auto batch = a.opt_uint("push-batch-pages", UINT32_MAX);
             auto prefetch = a.opt_uint("prefetch-pages", UINT32_MAX);
             auto channels = a.opt_uint("bulk-channels", 16);
             auto downtime = a.opt_uint("downtime-limit", 3'600'000);
             auto rounds = a.opt_uint("max-rounds", 1'000'000);
             auto pre_bytes = a.opt_uint("max-precopy-bytes", UINT64_MAX);
             auto pre_ms = a.opt_uint("max-precopy-ms", 86'400'000);
             auto compression = a.opt_str("compression");
             if (!compression) return std::unexpected(compression.error());
             for (auto* r : {&bw, &batch, &prefetch, &channels, &downtime, &rounds, &pre_bytes, &pre_ms})
                 if (!*r) return std::unexpected(r->error());
             std::optional<lazymig::Compression> comp;
             if (*compression) {
                 const std::string& c = **compression;
                 if (c == "off") comp = lazymig::Compression::off;
                 else if (c == "on") comp = lazymig::Compression::on;
                 else if (c == "auto") comp = lazymig::Compression::automatic;
                 else return generic("compression must be off, on or auto, not '" + c + "'");
             }
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             if (!*bw && !*batch && !*prefetch && !*channels && !*downtime && !*rounds && !*pre_bytes && !*pre_ms && !comp)
                 return generic("give at least one of max-bandwidth, push-batch-pages, prefetch-pages, bulk-channels, "
                                "downtime-limit, max-rounds, max-precopy-bytes, max-precopy-ms, compression");
             auto u32 = [](const auto& v) { return v ? std::optional<std::uint32_t>(*v) : std::nullopt; };
             ParameterUpdate u{*bw, u32(*batch), u32(*prefetch), u32(*channels), u32(*downtime), u32(*rounds), u32(*pre_ms),
                               *pre_bytes, comp};
             return from(migration_.set_parameters(u));
         }},
        {"query-migrate-parameters", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             const auto p = migration_.parameters();
             return json{{"max-bandwidth", p.max_bandwidth}, {"push-batch-pages", p.push_batch_pages},
                         {"prefetch-pages", p.prefetch_pages},
                         {"bulk-channels", p.bulk_channels ? p.bulk_channels : lazymig::default_bulk_channels()},
                         {"downtime-limit", static_cast<std::uint64_t>(p.downtime_limit_ms)}, {"max-rounds", p.max_rounds},
                         {"max-precopy-bytes", p.max_precopy_bytes}, {"max-precopy-ms", p.max_precopy_ms},
                         {"compression", p.compression == lazymig::Compression::off ? "off"
                                         : p.compression == lazymig::Compression::on ? "on" : "auto"}};
         }},
        // Post-copy recovery, as QEMU's: migrate-pause on either side closes the link on
        // purpose (both go to postcopy-paused); migrate-recover listens again on the
        // destination (returns {"uri": bound}) and reconnects the source.
        {"migrate-pause", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return from(migration_.pause());
         }},
        {"migrate-recover", [&](Args& a) -> Reply {
             auto uri = a.str("uri");
             if (!uri) return std::unexpected(uri.error());
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             auto r = migration_.recover(*uri);
             if (!r) return generic(r.error().message());
             return json{{"uri", *r}};
         }},
        {"migrate-cancel", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return from(migration_.cancel());
         }},
        {"stop", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return from(vm_.user_stop());
         }},
        {"cont", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return from(vm_.user_cont());
         }},
        {"query-status", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             json s = vm_.status();
             const auto uri = migration_.incoming_uri();
             s["incoming"] = uri ? json(*uri) : json(nullptr);
             const auto port = vm_.service_port();
             s["kv-port"] = port ? json(*port) : json(nullptr);
             return s;
         }},
        {"check-workload", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             auto r = vm_.check();
             if (!r) return generic(r.error().message());
             return json{{"ok", r->ok}, {"detail", r->detail}};
         }},
        {"query-version", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             return json{{"qemu", {{"major", LAZYMIG_VERSION_MAJOR}, {"minor", LAZYMIG_VERSION_MINOR},
                                   {"micro", LAZYMIG_VERSION_MICRO}}},
                         {"package", "lazymig " LAZYMIG_VERSION_STRING}};
         }},
        {"quit", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             quit_();
             return json::object();
         }},
    };
    auto it = table.find(cmd);
    if (cmd == "check-workload" && it != table.end()) {
        // Reads all of guest RAM (seconds for a large guest): run on the server's worker,
        // so other clients are answered meanwhile; this client's next request waits.
        session.deferred = [run = it->second, args_json, id] {
            hold_for_test();
            Args a(args_json);
            try {
                return response(run(a), id);
            } catch (const std::exception& e) {
                log_event("qmp_command_exception", "command=check-workload what=\"{}\"", e.what());
                return response(generic(fmt::format("internal error in check-workload: {}", e.what())), id);
            }
        };
        return {};
    }
    if (cmd == "query-commands") {
        json names = json::array();
        for (const auto& [name, h] : table) names.push_back({{"name", name}});
        names.push_back({{"name", "query-commands"}});
        names.push_back({{"name", "qmp_capabilities"}});
        return respond(names);
    }
    if (it == table.end()) return respond(std::unexpected(QmpError{"CommandNotFound", fmt::format("The command {} has not been found", cmd)}));
    try {
        return respond(it->second(args));
    } catch (const std::exception& e) {  // a bug, not a reason to take the VM down
        log_event("qmp_command_exception", "command={} what=\"{}\"", cmd, e.what());
        return respond(generic(fmt::format("internal error in {}: {}", cmd, e.what())));
    }
}

}  // namespace vmm
