// kv_table.hpp — an open-addressing hash table that lives entirely in guest RAM.
//
// Every page but page 0 holds its tag and 15 slots of 256 bytes from offset 64:
//   u32 lock (spinlock in guest RAM), u32 used, u16 key length, u16 value length,
//   u32 pad, u64 seq (writes to the slot), u64 check, key[48], value[176]
// check = slot_check(seed, slot, key, value, seq). Keys are never deleted, so a key's
// probe chain (home slot onwards, linear) never has a hole before the key. Any vCPU
// may call set/get concurrently: each slot is read and written under its own lock
// (guest_lock.hpp), held for one slot at a time. With a gate, an operation that waits
// for a lock while the gate asks for a pause gives up (aborted) having written nothing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "../guest_layout.hpp"
#include "../vcpu_gate.hpp"

namespace vmm {

class KvTable {
public:
    static constexpr std::size_t kMaxKey = 48, kMaxValue = 176;
    static constexpr std::size_t kSlotsPerPage = 15, kSlotSize = 256, kFirstSlot = 64;

    KvTable(const GuestView& ram, std::uint64_t seed, const VcpuGate* gate = nullptr)
        : ram_(ram), seed_(seed), gate_(gate) {}
    // Boot: tags every page; slots start zero (empty).
    static void format(const GuestView& ram, std::uint64_t seed);

    enum class SetResult { inserted, updated, full, invalid, aborted };
    SetResult set(std::string_view key, std::string_view value);
    enum class GetResult { found, missing, aborted };
    GetResult get(std::string_view key, std::string& value) const;

    // One request line of the text protocol in, one response line out (no newline):
    //   SET key value → OK | ERR ...      GET key → VALUE value | NOTFOUND      PING → PONG
    // `inserted` is incremented when a SET created a key. Nothing: aborted for a pause;
    // run the same line again after it.
    std::optional<std::string> execute(std::string_view line, std::uint64_t& inserted, std::uint64_t& sets,
                                       std::uint64_t& gets);

    // REQUIRES: no set/get running. `keys`: how many keys the vCPUs inserted.
    [[nodiscard]] CheckResult check(std::uint64_t keys) const;

    [[nodiscard]] std::size_t slots() const noexcept { return (ram_.pages() - 1) * kSlotsPerPage; }
    [[nodiscard]] static std::size_t slot_page(std::size_t s) noexcept { return 1 + s / kSlotsPerPage; }
    [[nodiscard]] static std::size_t slot_offset(std::size_t s) noexcept {
        return kFirstSlot + (s % kSlotsPerPage) * kSlotSize;
    }

private:
    struct Slot;
    [[nodiscard]] Slot* slot(std::size_t s) const noexcept;
    [[nodiscard]] std::size_t home(std::string_view key) const noexcept;
    [[nodiscard]] std::uint64_t slot_check(std::size_t s, const Slot& sl) const noexcept;

    GuestView ram_;
    std::uint64_t seed_;
    const VcpuGate* gate_;
};

}  // namespace vmm
