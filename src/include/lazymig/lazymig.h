/* lazymig.h — the C ABI over the embedding API (lazymig.hpp).
 *
 *   lazymig_destination *dst;
 *   lazymig_region ram = { "ram0", host, size, 4096, LAZYMIG_BACKING_MEMFD, memfd, 0 };
 *   if (lazymig_destination_listen(&ram, 1, &hooks, "tcp:0.0.0.0:4444", &dst) < 0)
 *       fprintf(stderr, "%s\n", lazymig_last_error());
 *   ... lazymig_destination_wait(dst); lazymig_destination_destroy(dst);
 *
 * Every int-returning call returns 0 on success and a negative errno on failure; without
 * a failing syscall's errno, -ECONNRESET for a lost link, -EPROTO for a peer that broke
 * the protocol, -EINVAL for a local logical error. lazymig_last_error() then holds the
 * sentence and lazymig_last_error_class() the class (LAZYMIG_ERROR_*), per thread.
 * Hooks run on lazymig's threads, as in lazymig.hpp. Objects are freed by _destroy,
 * which stops and joins their threads.
 */
#ifndef LAZYMIG_H
#define LAZYMIG_H

#include <stddef.h>
#include <stdint.h>

#include "lazymig/export.h"
#include "lazymig/version.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LAZYMIG_BACKING_ANON 1
#define LAZYMIG_BACKING_MEMFD 2
#define LAZYMIG_BACKING_HUGETLBFS 3

#define LAZYMIG_MODE_POSTCOPY 1
#define LAZYMIG_MODE_PRECOPY 2
#define LAZYMIG_MODE_HYBRID 3

/* Error classes (lazymig::ErrorClass): what the caller does about an error. */
#define LAZYMIG_ERROR_LOCAL 1           /* this host: fatal, the errno says why */
#define LAZYMIG_ERROR_TRANSPORT_LOST 2  /* the link broke or went silent: recoverable */
#define LAZYMIG_ERROR_PEER_VIOLATION 3  /* the peer broke the protocol: fatal */

/* Phases, as lazymig::Phase. */
#define LAZYMIG_PHASE_IDLE 1
#define LAZYMIG_PHASE_SETUP 2
#define LAZYMIG_PHASE_PRECOPY 3
#define LAZYMIG_PHASE_SWITCHOVER 4
#define LAZYMIG_PHASE_POSTCOPY 5
#define LAZYMIG_PHASE_COMPLETED 6
#define LAZYMIG_PHASE_FAILED 7
#define LAZYMIG_PHASE_CANCELLED 8
#define LAZYMIG_PHASE_PAUSED 9
#define LAZYMIG_PHASE_RECOVERING 10

typedef struct lazymig_region {
    const char *name;
    void *host;
    size_t size;
    size_t page_size;
    int backing;        /* LAZYMIG_BACKING_* */
    int fd;             /* memfd/hugetlbfs file, -1 for anon */
    uint64_t fd_offset;
} lazymig_region;

typedef struct lazymig_hooks {
    void *ctx;
    void (*pause_vcpus)(void *ctx);
    void (*resume_vcpus)(void *ctx);
    /* Source: set *buf to malloc()ed bytes (lazymig frees them) and *len; 0 or -errno. */
    int (*save_device_state)(void *ctx, void **buf, size_t *len);
    /* Destination: 0 or -errno. */
    int (*load_device_state)(void *ctx, const void *buf, size_t len);
    /* phase: LAZYMIG_PHASE_*; is_error: the message ends the migration. */
    void (*on_event)(void *ctx, int phase, int is_error, const char *message);
} lazymig_hooks;

typedef struct lazymig_stats {
    int phase;
    uint64_t total_pages, pages_present, pages_pushed, pages_demanded, zero_pages, duplicate_pages;
    uint64_t faults, requests, bytes_sent, bytes_received, device_state_bytes;
    double downtime_ms, elapsed_ms, postcopy_ms;
    double fault_p50_us, fault_p99_us, fault_p999_us, fault_max_us;
    uint64_t pages_missing;   /* destination, after a failure: pages that never arrived */
    int destination_resumed;  /* 1 once the VM runs at the destination */
    double blocktime_ms;      /* destination: vCPU time blocked on missing pages */
    uint32_t bulk_channels;   /* bulk channels in use */
} lazymig_stats;

typedef struct lazymig_source lazymig_source;
typedef struct lazymig_destination lazymig_destination;

/* The last error of a failed call on this thread ("" if none), and its class. */
LAZYMIG_API const char *lazymig_last_error(void);
LAZYMIG_API int lazymig_last_error_class(void);
/* The version of the library this program runs with, "MAJOR.MINOR.MICRO"; compare it
 * with LAZYMIG_VERSION_STRING (lazymig/version.h), the headers it was compiled with. */
LAZYMIG_API const char *lazymig_version(void);

LAZYMIG_API int lazymig_source_create(const lazymig_region *regions, size_t count, const lazymig_hooks *hooks,
                          const char *uri, int mode, lazymig_source **out);
LAZYMIG_API int lazymig_source_migrate(lazymig_source *src);
LAZYMIG_API int lazymig_source_wait(lazymig_source *src);
LAZYMIG_API void lazymig_source_cancel(lazymig_source *src);
LAZYMIG_API int lazymig_source_set_max_bandwidth(lazymig_source *src, uint64_t bytes_per_second);
/* Before _migrate: how many bulk channels (1..16) to open; default from the CPU count. */
LAZYMIG_API int lazymig_source_set_bulk_channels(lazymig_source *src, unsigned channels);
LAZYMIG_API int lazymig_source_stats(const lazymig_source *src, lazymig_stats *out);
LAZYMIG_API void lazymig_source_destroy(lazymig_source *src);

/* uri "tcp:HOST:PORT"; port 0 picks one, read it back with _local_uri. */
LAZYMIG_API int lazymig_destination_listen(const lazymig_region *regions, size_t count, const lazymig_hooks *hooks,
                               const char *uri, lazymig_destination **out);
/* Copies the bound "tcp:HOST:PORT" into buf (NUL-terminated); -ENOSPC if it does not fit. */
LAZYMIG_API int lazymig_destination_local_uri(const lazymig_destination *dst, char *buf, size_t len);
LAZYMIG_API int lazymig_destination_wait(lazymig_destination *dst);
LAZYMIG_API void lazymig_destination_cancel(lazymig_destination *dst);
LAZYMIG_API int lazymig_destination_stats(const lazymig_destination *dst, lazymig_stats *out);
/* Names the VMM's vCPU threads (gettid() values) for blocktime; replaces the last list. */
LAZYMIG_API int lazymig_destination_set_vcpu_threads(lazymig_destination *dst, const int *tids,
                                                     const char *const *names, size_t count);
LAZYMIG_API void lazymig_destination_destroy(lazymig_destination *dst);
/* As _listen, serving `uffd`, a userfaultfd another process (the VMM) created and
 * registered for MISSING faults over `regions` (its addresses; fd -1): pages are placed
 * with UFFDIO_COPY/ZEROPAGE into its memory (DestinationConfig::uffd in lazymig.hpp).
 * lazymig owns `uffd` from the call on, also when it fails. `auth` as for
 * lazymig_destination_listen_auth (below). */
LAZYMIG_API int lazymig_destination_listen_uffd(int uffd, const lazymig_region *regions, size_t count,
                                                const lazymig_hooks *hooks, const char *uri, const char *auth,
                                                lazymig_destination **out);

/* Pre-copy (modes LAZYMIG_MODE_PRECOPY and _HYBRID), as lazymig::Parameters: read at
 * every round. 0 in a max_* field means no bound. */
#define LAZYMIG_COMPRESSION_OFF 1
#define LAZYMIG_COMPRESSION_ON 2
#define LAZYMIG_COMPRESSION_AUTO 3  /* while pages pack >= 1.5x and the CPU keeps up */
typedef struct lazymig_precopy_params {
    double downtime_limit_ms;    /* stop-and-copy when the rest fits; lazymig's default 300 */
    uint32_t max_rounds;         /* default 30 */
    uint64_t max_precopy_bytes;
    uint32_t max_precopy_ms;
    int compression;             /* LAZYMIG_COMPRESSION_*; default AUTO */
} lazymig_precopy_params;
/* The current values into *out (the defaults before any _set_precopy). */
LAZYMIG_API int lazymig_source_get_precopy(const lazymig_source *src, lazymig_precopy_params *out);
/* Any time, also while it migrates; -EINVAL for a negative or non-finite downtime limit. */
LAZYMIG_API int lazymig_source_set_precopy(lazymig_source *src, const lazymig_precopy_params *params);
/* Pre-copy figures so far: rounds finished, pages sent again after a dirtying, pages
 * found stale at switchover (hybrid), and the switchover decision with its reason
 * copied into buf (NUL-terminated, cut to len). */
LAZYMIG_API int lazymig_source_precopy_stats(const lazymig_source *src, uint32_t *rounds, uint64_t *pages_resent,
                                             uint64_t *stale_pages, char *why, size_t len);

/* Authentication of the migration's channels (TLS 1.3), on by default: _source_create
 * and _destination_listen have no key and fail saying so. `auth` is "psk-file:PATH" (a
 * 0600 file holding the per-migration key in hex, e.g. `openssl rand -hex 32`),
 * "x509:DIR" (ca-cert.pem, server-/client-cert.pem and -key.pem, as QEMU's
 * tls-creds-x509), optionally "x509:DIR:PEERNAME" (the name the peer's certificate must
 * carry), or "none" (explicit: no authentication, no encryption). */
LAZYMIG_API int lazymig_source_create_auth(const lazymig_region *regions, size_t count, const lazymig_hooks *hooks,
                                           const char *uri, int mode, const char *auth, lazymig_source **out);
LAZYMIG_API int lazymig_destination_listen_auth(const lazymig_region *regions, size_t count,
                                                const lazymig_hooks *hooks, const char *uri, const char *auth,
                                                lazymig_destination **out);

/* Post-copy link loss (lazymig.hpp, "Link loss during post-copy"): both sides go to
 * LAZYMIG_PHASE_PAUSED and keep all state until _recover. _pause closes this side's
 * channels on purpose (post-copy only; otherwise -1 with a sentence). _recover: the
 * destination listens again on `uri` (same or new address; _local_uri then tells the
 * port), the source connects there; both return at once, the phase tells the outcome.
 * TCP only: an RDMA migration refuses both. */
LAZYMIG_API int lazymig_source_pause(lazymig_source *src);
LAZYMIG_API int lazymig_source_recover(lazymig_source *src, const char *uri);
LAZYMIG_API int lazymig_destination_pause(lazymig_destination *dst);
LAZYMIG_API int lazymig_destination_recover(lazymig_destination *dst, const char *uri);
/* How long the source stays paused without _recover before it fails (default 60000 ms);
 * before _migrate. */
LAZYMIG_API int lazymig_source_set_recover_timeout(lazymig_source *src, uint32_t ms);
/* As _listen_auth, with the destination's recovery settings: recover_timeout_ms (0: the
 * default 60000) and poison_on_loss (1: when the source is lost, poison only the missing
 * pages and let the vCPUs run; 0: stop the VM). */
LAZYMIG_API int lazymig_destination_listen_recoverable(const lazymig_region *regions, size_t count,
                                                       const lazymig_hooks *hooks, const char *uri, const char *auth,
                                                       uint32_t recover_timeout_ms, int poison_on_loss,
                                                       lazymig_destination **out);
typedef struct lazymig_recovery_stats {
    uint32_t pauses;                /* times paused */
    uint32_t recoveries;            /* times back to post-copy after a recover */
    uint64_t pages_lost_in_flight;  /* source: sent, lacking at a recover, sent again */
    uint64_t refused_resumes;       /* destination: RESUMEs of another session refused */
    uint64_t pages_poisoned;        /* destination, source lost: pages poisoned */
    int vm_stopped;                 /* destination, source lost: 1 if the vCPUs were paused */
} lazymig_recovery_stats;
LAZYMIG_API int lazymig_source_recovery_stats(const lazymig_source *src, lazymig_recovery_stats *out);
LAZYMIG_API int lazymig_destination_recovery_stats(const lazymig_destination *dst, lazymig_recovery_stats *out);

/* Hybrid back-replication, output commit and fencing (lazymig.hpp: Parameters::epoch_ms,
 * lease_ms; VmmHooks::on_epoch_committed; Destination::open_epoch). As
 * _listen_recoverable, with: epoch_ms, an epoch every epoch_ms (0 turns back-replication
 * off; the source must say 0 too); lease_ms, the fence (0: 1000; the same at the source);
 * on_committed(hooks->ctx, n) (may be NULL), called when every epoch up to n is applied
 * at the source: output the VMM produced while _open_epoch returned e <= n may go out. */
LAZYMIG_API int lazymig_destination_listen_hybrid(const lazymig_region *regions, size_t count,
                                                  const lazymig_hooks *hooks, const char *uri, const char *auth,
                                                  uint32_t recover_timeout_ms, int poison_on_loss, uint32_t epoch_ms,
                                                  uint32_t lease_ms, void (*on_committed)(void *ctx, uint64_t epoch),
                                                  lazymig_destination **out);
/* The epoch output produced now belongs to (1, 2, ...; 0 when not replicating). */
LAZYMIG_API uint64_t lazymig_destination_open_epoch(const lazymig_destination *dst);
/* Before _migrate, as the destination's: epoch_ms (0: back-replication off) and lease_ms
 * (0 keeps 1000). The source's hooks->load_device_state loads a checkpoint's device state
 * when it resumes the VM after losing the destination. */
LAZYMIG_API int lazymig_source_set_replication(lazymig_source *src, uint32_t epoch_ms, uint32_t lease_ms);
typedef struct lazymig_replication_stats {
    uint64_t epochs;              /* destination: sent; source: applied */
    uint64_t epochs_committed;    /* destination: acknowledged (output released) */
    uint64_t epoch_pages;         /* destination: pages sent; source: applied */
    uint64_t epoch_overflows;     /* destination: epochs larger than the staging area */
    double pause_p50_us, pause_p99_us, pause_max_us;  /* destination: vCPU pause per epoch */
    double commit_p50_us, commit_p99_us;               /* destination: EPOCH_END → EPOCH_ACK */
    int fenced;                   /* destination: the lease lapsed; the VM never resumes there */
    int resumed_on_source;        /* source: the VM resumed here from a checkpoint */
    uint64_t resumed_from_epoch;  /* source: which (0: the switchover's state) */
} lazymig_replication_stats;
LAZYMIG_API int lazymig_source_replication_stats(const lazymig_source *src, lazymig_replication_stats *out);
LAZYMIG_API int lazymig_destination_replication_stats(const lazymig_destination *dst,
                                                      lazymig_replication_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* LAZYMIG_H */
