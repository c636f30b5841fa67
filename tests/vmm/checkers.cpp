// vmm/checker/*: each workload's checker passes a correct run and names a damaged page
// by its guest-physical address. vmm/device-state/*, vmm/gate/*: the pieces under them.
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "device_state.hpp"
#include "lazymig/lazymig.hpp"
#include "workloads/workloads.hpp"

using namespace vmm;

namespace {
constexpr std::size_t kPages = 256;  // 1 MiB of guest RAM
constexpr std::uint64_t kSeed = 0x1234567890abcdefull;

struct Guest {
    lazymig::GuestMemory mem;
    GuestView view;
    std::vector<VcpuRegs> regs;
    Guest() : regs(2) {
        auto m = lazymig::GuestMemory::create("test", kPages * kGuestPage, lazymig::Backing::anon, false);
        REQUIRE_MESSAGE(m.has_value(), (m ? "" : m.error().message()));
        mem = std::move(*m);
        view = {mem.data(), mem.size()};
    }
    // A page that never arrived: the kernel hands back zeroes for it.
    void lose(std::size_t page) { REQUIRE(::madvise(view.page(page), kGuestPage, MADV_DONTNEED) == 0); }
    void flip(std::size_t page, std::size_t offset) { view.page(page)[offset] ^= std::byte{0x10}; }
};

std::string gpa(std::size_t page) { return fmt::format("gpa {:#x}", page * kGuestPage); }

WorkloadConfig config(WorkloadKind k) {
    WorkloadConfig c;
    c.kind = k;
    c.vcpus = 2;
    return c;
}
}  // namespace

TEST_CASE("vmm/checker/pattern") {
    Guest g;
    PatternWorkload w(config(WorkloadKind::pattern));
    w.boot(g.view, kSeed, g.regs);
    // vCPU 0 is mid-way through its third pass, vCPU 1 early in its second.
    for (int i = 0; i < 300; ++i) PatternWorkload::step(g.view, g.regs[0]);
    for (int i = 0; i < 140; ++i) PatternWorkload::step(g.view, g.regs[1]);
    REQUIRE(w.check(g.view, g.regs).ok);

    SUBCASE("a correct run passes") {
        auto r = w.check(g.view, g.regs);
        CHECK(r.detail.find("255 pages consistent") != std::string::npos);
    }
    SUBCASE("a flipped counter byte is named") {
        g.flip(200, 8);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(200)) != std::string::npos);
    }
    SUBCASE("a lost page is named") {
        g.lose(77);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(77)) != std::string::npos);
        CHECK(r.detail.find("lost (reads as zero)") != std::string::npos);
    }
    SUBCASE("a stale page (one pass behind) is named") {
        // vCPU 0 owns pages 1..127 and its cursor is at 300 - 2*127 = 46: page 10 is behind it.
        auto* counter = g.view.at<std::uint64_t>(10, 8);
        --*counter;
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(10)) != std::string::npos);
        CHECK(r.detail.find("stale (one pass behind)") != std::string::npos);
    }
    SUBCASE("a lost boot header is named") {
        g.lose(0);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(0)) != std::string::npos);
    }
}

TEST_CASE("vmm/checker/bank") {
    Guest g;
    BankWorkload w(config(WorkloadKind::bank));
    w.boot(g.view, kSeed, g.regs);
    int done = 0;
    for (int i = 0; i < 5000; ++i) done += BankWorkload::step(g.view, g.regs[i % 2]);
    REQUIRE(done == 5000);  // without a gate a transfer never gives up
    REQUIRE(w.check(g.view, g.regs).ok);

    SUBCASE("a correct run passes, the sum is kept") {
        auto r = w.check(g.view, g.regs);
        CHECK(r.detail.find(fmt::format("sum to {}", 255 * 4 * BankWorkload::kInitialBalance)) != std::string::npos);
        CHECK(r.detail.find("5000 transfers") != std::string::npos);
    }
    SUBCASE("a flipped balance byte is named") {
        const std::size_t a = 333;
        g.flip(BankWorkload::account_page(a), BankWorkload::account_offset(a) + 8);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(BankWorkload::account_page(a))) != std::string::npos);
        CHECK(r.detail.find("account 333") != std::string::npos);
    }
    SUBCASE("a lost page is named") {
        g.lose(150);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(150)) != std::string::npos);
    }
    SUBCASE("a stale page is named by the versions its accounts' partners saw") {
        std::vector<std::byte> old(g.view.page(42), g.view.page(42) + kGuestPage);
        for (int i = 0; i < 20000; ++i) BankWorkload::step(g.view, g.regs[i % 2]);
        REQUIRE(std::memcmp(old.data(), g.view.page(42), kGuestPage) != 0);  // a transfer touched it
        std::memcpy(g.view.page(42), old.data(), kGuestPage);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(42) + ", host") != std::string::npos);
        CHECK(r.detail.find(") stale: account") != std::string::npos);
        CHECK(r.detail.find("and 1 more bad") != std::string::npos);  // the sum is off too
    }
}

TEST_CASE("vmm/checker/kv") {
    Guest g;
    KvWorkload w(config(WorkloadKind::kv));
    w.boot(g.view, kSeed, g.regs);
    KvTable t(g.view, kSeed);
    std::uint64_t sets = 0, gets = 0;
    int ok = 0;
    for (int i = 0; i < 1500; ++i)
        ok += t.execute(fmt::format("SET key{} value-{}", i % 1000, i), g.regs[i % 2].r[0], sets, gets) == "OK";
    REQUIRE(ok == 1500);
    REQUIRE(w.check(g.view, g.regs).ok);

    SUBCASE("a correct run passes and serves its values") {
        CHECK(w.check(g.view, g.regs).detail.find("1000 keys consistent") != std::string::npos);
        CHECK(t.execute("GET key7", g.regs[0].r[0], sets, gets) == "VALUE value-1007");
        CHECK(t.execute("GET nope", g.regs[0].r[0], sets, gets) == "NOTFOUND");
        CHECK(t.execute("PING", g.regs[0].r[0], sets, gets) == "PONG");
        CHECK(t.execute("DEL key7", g.regs[0].r[0], sets, gets)->starts_with("ERR"));
    }
    SUBCASE("a flipped value byte is named") {
        // Find the slot holding key7 by its value text.
        std::size_t slot = 0;
        for (; slot < t.slots(); ++slot) {
            const char* v = g.view.at<char>(KvTable::slot_page(slot), KvTable::slot_offset(slot) + 80);
            if (std::strncmp(v, "value-1007", 10) == 0) break;
        }
        REQUIRE(slot < t.slots());
        g.flip(KvTable::slot_page(slot), KvTable::slot_offset(slot) + 80 + 3);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(KvTable::slot_page(slot))) != std::string::npos);
        CHECK(r.detail.find(fmt::format("slot {}", slot)) != std::string::npos);
    }
    SUBCASE("a lost page is named") {
        g.lose(9);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(9)) != std::string::npos);
    }
}

TEST_CASE("vmm/checker/idle") {
    Guest g;
    IdleWorkload w(config(WorkloadKind::idle));
    w.boot(g.view, kSeed, g.regs);
    for (int i = 0; i < 127; ++i) IdleWorkload::step(g.view, g.regs[0]);  // all of vCPU 0's share
    for (int i = 0; i < 50; ++i) IdleWorkload::step(g.view, g.regs[1]);   // part of vCPU 1's
    CHECK(w.check(g.view, g.regs).ok);
    g.lose(30);
    auto r = w.check(g.view, g.regs);
    CHECK_FALSE(r.ok);
    CHECK(r.detail.find(gpa(30)) != std::string::npos);
}

TEST_CASE("vmm/checker/dirty") {
    for (auto pattern : {DirtyPattern::seq, DirtyPattern::random, DirtyPattern::zipf}) {
        CAPTURE(to_string(pattern));
        Guest g;
        auto cfg = config(WorkloadKind::dirty);
        cfg.pattern = pattern;
        cfg.working_set_pct = 50;
        DirtyWorkload w(cfg);
        w.boot(g.view, kSeed, g.regs);
        for (int i = 0; i < 4000; ++i) w.step(g.view, g.regs[i % 2], i % 2);
        REQUIRE(w.check(g.view, g.regs).ok);
        g.flip(5, 8);  // a counter: the sum no longer matches
        CHECK_FALSE(w.check(g.view, g.regs).ok);
        g.flip(5, 8);
        g.lose(6);
        auto r = w.check(g.view, g.regs);
        CHECK_FALSE(r.ok);
        CHECK(r.detail.find(gpa(6)) != std::string::npos);
    }
}

TEST_CASE("vmm/device-state/round-trip-and-refusals") {
    DeviceState s{WorkloadKind::bank, 2, 64u << 20, kSeed, std::vector<VcpuRegs>(2)};
    s.regs[1].r[3] = 42;
    auto blob = encode_device_state(s);
    SUBCASE("round trip") {
        auto d = decode_device_state(blob);
        REQUIRE(d.has_value());
        CHECK(d->kind == WorkloadKind::bank);
        CHECK(d->memory == (64u << 20));
        CHECK(d->seed == kSeed);
        CHECK(d->regs[1].r[3] == 42);
    }
    SUBCASE("a flipped byte fails the checksum") {
        blob[40] ^= std::byte{1};
        auto d = decode_device_state(blob);
        REQUIRE_FALSE(d.has_value());
        CHECK(d.error().message() == "device state: checksum mismatch (corrupt in transit?)");
    }
    SUBCASE("a short blob is refused") {
        blob.resize(blob.size() - 8);
        REQUIRE_FALSE(decode_device_state(blob).has_value());
        CHECK(decode_device_state(std::span(blob).first(10)).error().message().find("shorter than its header") != std::string::npos);
    }
}

TEST_CASE("vmm/gate/pause-parks-every-vcpu") {
    VcpuGate gate;
    std::atomic<std::uint64_t> ops{0};
    gate.add_vcpus(2);
    std::vector<std::thread> vcpus;
    for (int v = 0; v < 2; ++v)
        vcpus.emplace_back([&] {
            while (gate.safe_point()) ops.fetch_add(1, std::memory_order_relaxed);
            gate.vcpu_exited();
        });
    gate.pause(PauseReason::user);
    const auto frozen = ops.load();
    gate.pause(PauseReason::check);  // already parked: returns at once
    CHECK(ops.load() == frozen);
    gate.resume(PauseReason::user);
    CHECK(ops.load() == frozen);  // still paused for the check
    CHECK_FALSE(gate.running());
    gate.resume(PauseReason::check);
    CHECK(gate.running());
    gate.stop();
    for (auto& t : vcpus) t.join();
}

TEST_CASE("vmm/gate/halted-vcpus-wake-for-pause-and-work") {
    VcpuGate gate;
    int work = 0, done = 0;  // under the gate's lock
    gate.add_vcpus(2);
    std::thread timer([&] {  // halted on a timer an hour away
        while (gate.idle_until(VcpuGate::Clock::now() + std::chrono::hours(1))) {
        }
        gate.vcpu_exited();
    });
    std::thread worker([&] {  // halted waiting for work
        while (gate.wait_work([&] { return work > 0 && (--work, ++done, true); })) {
        }
        gate.vcpu_exited();
    });
    gate.pause(PauseReason::user);  // returns only because both halted vCPUs parked
    gate.interrupt([&] { work = 3; });
    gate.resume(PauseReason::user);
    gate.pause(PauseReason::user);
    gate.interrupt([&] { CHECK(work + done == 3); });
    gate.resume(PauseReason::user);
    gate.stop();
    timer.join();
    worker.join();
}
