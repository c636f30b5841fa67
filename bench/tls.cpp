// The TLS rows of scripts/bench --tls: the same migrations with TLS 1.3 on and off,
// beside a raw AES-128-GCM throughput floor (OpenSSL EVP over 1 MiB buffers, one core,
// measured in this run): the most TLS can cost per byte on this machine.
#include "bench/tls.hpp"

#include <openssl/evp.h>

#include <fmt/format.h>

#include "bench/migration.hpp"

namespace bench {
namespace {

// GB/s of AES-128-GCM over `total` bytes in 1 MiB messages (TLS records are 16 KiB; a
// 1 MiB message measures the cipher, not the per-record overhead), encrypting or
// decrypting into a second buffer.
double aes_gcm_gbps(std::size_t total, bool encrypt) {
    constexpr std::size_t kBuf = 1u << 20;
    std::vector<unsigned char> in(kBuf, 0x5a), out(kBuf + 16), key(16, 7), iv(12, 1), tag(16);
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    const EVP_CIPHER* aes = EVP_aes_128_gcm();
    const std::uint64_t t0 = now_ns();
    for (std::size_t done = 0; done < total; done += kBuf) {
        int n = 0;
        if (encrypt) {
            EVP_EncryptInit_ex(ctx, aes, nullptr, key.data(), iv.data());
            EVP_EncryptUpdate(ctx, out.data(), &n, in.data(), static_cast<int>(kBuf));
            EVP_EncryptFinal_ex(ctx, out.data() + n, &n);
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag.data());
        } else {  // the tag will not verify: only the work is measured
            EVP_DecryptInit_ex(ctx, aes, nullptr, key.data(), iv.data());
            EVP_DecryptUpdate(ctx, out.data(), &n, in.data(), static_cast<int>(kBuf));
        }
        ++iv[0];
    }
    const double s = double(now_ns() - t0) / 1e9;
    EVP_CIPHER_CTX_free(ctx);
    return double(total) / s / 1e9;
}

}  // namespace

bool tls_rows(Report& rep, Child& source, std::size_t bytes, lazymig::Backing backing, int touchers,
              std::uint64_t samples) {
    const std::size_t total = std::min<std::size_t>(bytes, 1ull << 30);
    const double enc = aes_gcm_gbps(total, true), dec = aes_gcm_gbps(total, false);
    rep.line(fmt::format("\nTLS 1.3 (OpenSSL, encryption in user space; this kernel has no kernel TLS), {} MiB {}",
                         bytes >> 20, to_string(backing)));
    rep.line(fmt::format("  floor: AES-128-GCM over 1 MiB buffers, one core: encrypt {:.2f} GB/s, decrypt {:.2f} GB/s",
                         enc, dec));
    rep.json.num("floor_aes_gcm_encrypt_gbps", enc);
    rep.json.num("floor_aes_gcm_decrypt_gbps", dec);
    bool ok = true;
    Fields runs[2][2];  // [tls][fault]
    for (int fault = 0; fault < 2; ++fault)
        for (int tls = 0; tls < 2; ++tls) {
            runs[tls][fault] = run_migration(source, MigrationRun{.bytes = bytes, .backing = backing,
                                                                  .touchers = fault ? touchers : 0,
                                                                  .max_samples = samples, .tls = tls != 0});
            const Fields& f = runs[tls][fault];
            if (f.has("error") || f.num("verify_errors", 1) != 0) {
                rep.line("  ERROR: " + (f.has("error") ? f.str("error") : std::string("memory differs")));
                ok = false;
            }
        }
    const double plain = runs[0][0].num("push_gbps"), tls = runs[1][0].num("push_gbps");
    rep.line(fmt::format("  push, 0 touchers           none {:.2f} GB/s   TLS {:.2f} GB/s   ({:.2f}x; {:.2f}x of the "
                         "AES-GCM encrypt floor)", plain, tls, plain > 0 ? tls / plain : 0, enc > 0 ? tls / enc : 0));
    for (const char* what : {"touch", "lib_fault"}) {
        const std::string p50 = std::string(what) + "_p50_us", p99 = std::string(what) + "_p99_us";
        rep.line(fmt::format("  {:<26} none {:.0f} / {:.0f} us   TLS {:.0f} / {:.0f} us", 
                             std::string(what == std::string("touch") ? "fault p50/p99 (vCPU)" : "fault p50/p99 (library)"),
                             runs[0][1].num(p50), runs[0][1].num(p99), runs[1][1].num(p50), runs[1][1].num(p99)));
    }
    rep.json.num("tls_push_gbps", tls);
    rep.json.num("notls_push_gbps", plain);
    rep.json.num("tls_fault_p50_us", runs[1][1].num("touch_p50_us"));
    rep.json.num("tls_fault_p99_us", runs[1][1].num("touch_p99_us"));
    rep.json.num("notls_fault_p50_us", runs[0][1].num("touch_p50_us"));
    rep.json.num("notls_fault_p99_us", runs[0][1].num("touch_p99_us"));
    return ok;
}

}  // namespace bench
