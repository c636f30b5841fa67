#include "kv_table.hpp"

#include <cstring>

#include <fmt/format.h>

#include "guest_lock.hpp"

namespace vmm {

struct KvTable::Slot {
    std::uint32_t lock;
    std::uint32_t used;
    std::uint16_t klen, vlen;
    std::uint32_t pad;
    std::uint64_t seq;
    std::uint64_t check;
    char key[kMaxKey];
    char value[kMaxValue];
};

namespace {
std::uint64_t fnv1a(std::string_view s) noexcept {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

// Holds a slot's guest lock for a scope, if it got it.
class SlotLock {
public:
    SlotLock(std::uint32_t& word, const VcpuGate* gate) : w_(word), held_(guest_lock(word, gate)) {}
    ~SlotLock() {
        if (held_) guest_unlock(w_);
    }
    SlotLock(const SlotLock&) = delete;
    SlotLock& operator=(const SlotLock&) = delete;
    [[nodiscard]] bool held() const noexcept { return held_; }

private:
    std::uint32_t& w_;
    const bool held_;
};
}  // namespace

KvTable::Slot* KvTable::slot(std::size_t s) const noexcept {
    static_assert(sizeof(Slot) == kSlotSize);
    return ram_.at<Slot>(slot_page(s), slot_offset(s));
}

std::size_t KvTable::home(std::string_view key) const noexcept { return mix64(fnv1a(key) ^ seed_) % slots(); }

std::uint64_t KvTable::slot_check(std::size_t s, const Slot& sl) const noexcept {
    const std::string_view k(sl.key, std::min<std::size_t>(sl.klen, kMaxKey));
    const std::string_view v(sl.value, std::min<std::size_t>(sl.vlen, kMaxValue));
    return mix64(seed_ ^ mix64(s + (std::uint64_t{sl.klen} << 32) + (std::uint64_t{sl.vlen} << 48)) ^
                 mix64(fnv1a(k) + 3 * fnv1a(v)) ^ mix64(sl.seq * 0x9e3779b97f4a7c15ull)) | 1;
}

void KvTable::format(const GuestView& ram, std::uint64_t seed) {
    for (std::size_t p = 1; p < ram.pages(); ++p) store_word(ram, p, 0, page_tag(seed, p));
}

KvTable::SetResult KvTable::set(std::string_view key, std::string_view value) {
    if (key.empty() || key.size() > kMaxKey || value.size() > kMaxValue) return SetResult::invalid;
    const std::size_t n = slots(), h = home(key);
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t s = (h + i) % n;
        Slot* sl = slot(s);
        SlotLock lock(sl->lock, gate_);
        if (!lock.held()) return SetResult::aborted;
        const bool empty = sl->used == 0;
        if (!empty && std::string_view(sl->key, sl->klen) != key) continue;
        if (empty) {
            sl->used = 1;
            sl->klen = static_cast<std::uint16_t>(key.size());
            std::memcpy(sl->key, key.data(), key.size());
        }
        sl->vlen = static_cast<std::uint16_t>(value.size());
        std::memcpy(sl->value, value.data(), value.size());
        ++sl->seq;
        sl->check = slot_check(s, *sl);
        return empty ? SetResult::inserted : SetResult::updated;
    }
    return SetResult::full;
}

KvTable::GetResult KvTable::get(std::string_view key, std::string& value) const {
    if (key.empty() || key.size() > kMaxKey) return GetResult::missing;
    const std::size_t n = slots(), h = home(key);
    for (std::size_t i = 0; i < n; ++i) {
        Slot* sl = slot((h + i) % n);
        SlotLock lock(sl->lock, gate_);
        if (!lock.held()) return GetResult::aborted;
        if (sl->used == 0) return GetResult::missing;
        if (std::string_view(sl->key, sl->klen) == key) {
            value.assign(sl->value, sl->vlen);
            return GetResult::found;
        }
    }
    return GetResult::missing;
}

std::optional<std::string> KvTable::execute(std::string_view line, std::uint64_t& inserted, std::uint64_t& sets,
                                            std::uint64_t& gets) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const auto sp1 = line.find(' ');
    const std::string_view verb = line.substr(0, sp1);
    const std::string_view rest = sp1 == std::string_view::npos ? std::string_view{} : line.substr(sp1 + 1);
    if (verb == "PING") return "PONG";
    if (verb == "GET") {
        if (rest.empty() || rest.size() > kMaxKey || rest.find(' ') != std::string_view::npos)
            return fmt::format("ERR GET takes one key of 1..{} bytes", kMaxKey);
        std::string v;
        switch (get(rest, v)) {
        case GetResult::found: ++gets; return "VALUE " + v;
        case GetResult::missing: ++gets; return "NOTFOUND";
        case GetResult::aborted: break;
        }
        return std::nullopt;
    }
    if (verb == "SET") {
        const auto sp2 = rest.find(' ');
        if (sp2 == std::string_view::npos) return "ERR SET takes a key and a value";
        const std::string_view key = rest.substr(0, sp2), value = rest.substr(sp2 + 1);
        switch (set(key, value)) {
        case SetResult::inserted: ++inserted; [[fallthrough]];
        case SetResult::updated: ++sets; return "OK";
        case SetResult::full: return "ERR table full";
        case SetResult::aborted: return std::nullopt;
        case SetResult::invalid: break;
        }
        return fmt::format("ERR key must be 1..{} bytes and value at most {}", kMaxKey, kMaxValue);
    }
    return "ERR unknown command (GET, SET, PING)";
}

CheckResult KvTable::check(std::uint64_t keys) const {
    CheckReport report;
    const std::size_t n = slots();
    std::uint64_t used = 0;
    for (std::size_t p = 1; p < ram_.pages(); ++p)
        if (auto bad = check_tag(ram_, seed_, p); !bad.empty()) report.fail(std::move(bad));
    for (std::size_t s = 0; s < n && !report.failed(); ++s) {
        const Slot& sl = *slot(s);
        const auto where = [&] { return fmt::format("{}: slot {} (offset {:#x})", describe_page(ram_, slot_page(s)), s, slot_offset(s)); };
        if (sl.lock != 0) {
            report.fail(where() + " locked while every vCPU is parked");
            continue;
        }
        if (sl.used == 0) {
            if (sl.klen != 0 || sl.vlen != 0 || sl.seq != 0 || sl.check != 0) report.fail(where() + " corrupt: empty slot with contents");
            continue;
        }
        ++used;
        if (sl.used != 1 || sl.klen == 0 || sl.klen > kMaxKey || sl.vlen > kMaxValue || sl.check != slot_check(s, sl)) {
            report.fail(where() + " corrupt: contents fail the check word");
            continue;
        }
        const std::string_view key(sl.key, sl.klen);
        for (std::size_t i = home(key); i != s; i = (i + 1) % n) {
            const Slot& before = *slot(i);
            if (before.used == 0) {
                report.fail(fmt::format("{}: key '{}' unreachable: slot {} on its probe chain is empty (lost?)", where(), key, i));
                break;
            }
            if (std::string_view(before.key, before.klen) == key) {
                report.fail(fmt::format("{}: key '{}' duplicated in slot {}", where(), key, i));
                break;
            }
        }
    }
    if (!report.failed() && used != keys)
        report.fail(fmt::format("{} keys in the table, the vCPUs inserted {}: a page holds stale contents", used, keys));
    return report.finish(fmt::format("kv: {} keys consistent in {} slots", used, n));
}

}  // namespace vmm
