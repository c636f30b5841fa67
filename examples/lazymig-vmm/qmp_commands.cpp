#include "qmp_commands.hpp"

#include <expected>
#include <map>
#include <set>

#include <fmt/format.h>

#include "log.hpp"
#include "migration.hpp"
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

std::string QmpCommands::handle(std::string_view line, QmpServer::Session& session) {
    json req;
    json id;
    auto respond = [&](const Reply& r) {
        json out = r ? json{{"return", *r}} : json{{"error", {{"class", r.error().cls}, {"desc", r.error().desc}}}};
        if (!id.is_null()) out["id"] = id;
        return out.dump(-1, ' ', false, json::error_handler_t::replace);
    };
    try {
        req = json::parse(line);
    } catch (const json::exception& e) {
        return respond(generic(fmt::format("JSON parse error: {}", e.what())));
    }
    if (!req.is_object()) return respond(generic("a request must be a JSON object"));
    if (req.contains("id")) id = req["id"];
    for (const auto& [k, v] : req.items())
        if (k != "execute" && k != "arguments" && k != "id") return respond(generic(fmt::format("unexpected member '{}'", k)));
    if (!req.contains("execute") || !req["execute"].is_string())
        return respond(generic("'execute' must be present and a string"));
    const json args_json = req.value("arguments", json::object());
    if (!args_json.is_object()) return respond(generic("'arguments' must be an object"));
    const std::string cmd = req["execute"];
    Args args(args_json);

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
             for (auto* r : {&bw, &batch, &prefetch, &channels})
                 if (!*r) return std::unexpected(r->error());
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             if (!*bw && !*batch && !*prefetch && !*channels)
                 return generic("give at least one of max-bandwidth, push-batch-pages, prefetch-pages, bulk-channels");
             auto u32 = [](const auto& v) { return v ? std::optional<std::uint32_t>(*v) : std::nullopt; };
             ParameterUpdate u{*bw, u32(*batch), u32(*prefetch), u32(*channels)};
             return from(migration_.set_parameters(u));
         }},
        {"query-migrate-parameters", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             const auto p = migration_.parameters();
             return json{{"max-bandwidth", p.max_bandwidth}, {"push-batch-pages", p.push_batch_pages},
                         {"prefetch-pages", p.prefetch_pages},
                         {"bulk-channels", p.bulk_channels ? p.bulk_channels : lazymig::default_bulk_channels()}};
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
        {"enable-events", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             session.events = true;
             return json::object();
         }},
        {"quit", [&](Args& a) -> Reply {
             if (auto ok = a.done(); !ok) return std::unexpected(ok.error());
             quit_();
             return json::object();
         }},
    };
    auto it = table.find(cmd);
    if (cmd == "query-commands") {
        json names = json::array();
        for (const auto& [name, h] : table) names.push_back({{"name", name}});
        names.push_back({{"name", "query-commands"}});
        return respond(names);
    }
    if (it == table.end()) return respond(std::unexpected(QmpError{"CommandNotFound", fmt::format("the command {} has not been found", cmd)}));
    try {
        return respond(it->second(args));
    } catch (const std::exception& e) {  // a bug, not a reason to take the VM down
        log_event("qmp_command_exception", "command={} what=\"{}\"", cmd, e.what());
        return respond(generic(fmt::format("internal error in {}: {}", cmd, e.what())));
    }
}

}  // namespace vmm
