/* embed.c — the smallest VMM that migrates its RAM with lazymig, through the C ABI.
 *
 * One process forks: the child is the destination (empty memfd RAM, listening on a
 * port the kernel picks), the parent is the source (RAM filled with a pattern). The
 * child checks every byte after the migration and exits 0 only if all arrived intact.
 *
 *   ./lazymig-embed [MiB]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lazymig/lazymig.h"

static uint64_t pattern(uint64_t i) { return (i + 1) * 0x9E3779B97F4A7C15ull; }

static void nop(void *ctx) { (void)ctx; }

static int save_state(void *ctx, void **buf, size_t *len) {
    (void)ctx;
    *buf = strdup("vcpu0: rip=0x1000");
    if (!*buf) return -ENOMEM;
    *len = strlen(*buf) + 1;
    return 0;
}

static int load_state(void *ctx, const void *buf, size_t len) {
    (void)ctx;
    printf("destination: device state '%.*s'\n", (int)len, (const char *)buf);
    return 0;
}

static void on_event(void *ctx, int phase, int is_error, const char *message) {
    printf("%s: phase %d%s: %s\n", (const char *)ctx, phase, is_error ? " (error)" : "", message);
}

static void *guest_ram(size_t size, int *fd) {
    *fd = memfd_create("guest-ram", MFD_CLOEXEC);
    if (*fd < 0 || ftruncate(*fd, (off_t)size) != 0) return NULL;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* The migration's key: 32 random bytes as hex in a 0600 file both sides read (a real
 * management plane hands each host its copy). */
static char key_file[] = "/tmp/lazymig-embed-key-XXXXXX";
static char auth[sizeof key_file + 16];

static int make_key(void) {
    unsigned char key[32];
    FILE *r = fopen("/dev/urandom", "rb");
    if (!r || fread(key, 1, sizeof key, r) != sizeof key) return perror("/dev/urandom"), -1;
    fclose(r);
    int fd = mkstemp(key_file); /* mode 0600 */
    if (fd < 0) return perror("mkstemp"), -1;
    char hex[2 * sizeof key + 2];
    for (size_t i = 0; i < sizeof key; ++i) sprintf(hex + 2 * i, "%02x", key[i]);
    strcat(hex, "\n");
    if (write(fd, hex, strlen(hex)) != (ssize_t)strlen(hex)) return perror("writing the key"), close(fd), -1;
    close(fd);
    snprintf(auth, sizeof auth, "psk-file:%s", key_file);
    return 0;
}

static int destination(size_t size, int port_pipe) {
    int fd;
    uint64_t *ram = guest_ram(size, &fd);
    if (!ram) return perror("destination: guest RAM"), 1;
    lazymig_region region = {"ram0", ram, size, 4096, LAZYMIG_BACKING_MEMFD, fd, 0};
    lazymig_hooks hooks = {"destination", nop, nop, NULL, load_state, on_event};
    lazymig_destination *dst;
    if (lazymig_destination_listen_auth(&region, 1, &hooks, "tcp:127.0.0.1:0", auth, &dst) < 0)
        return fprintf(stderr, "destination: %s\n", lazymig_last_error()), 1;
    char uri[64];
    if (lazymig_destination_local_uri(dst, uri, sizeof uri) < 0 || write(port_pipe, uri, sizeof uri) != sizeof uri)
        return fprintf(stderr, "destination: cannot publish the uri\n"), 1;
    close(port_pipe);
    /* The VM runs from here; touching RAM now faults pages in on demand. */
    uint64_t sum = 0;
    for (size_t i = 0; i < size / 8; i += 4096 / 8 * 97) sum += ram[i];
    int rc = lazymig_destination_wait(dst);
    if (rc < 0) return fprintf(stderr, "destination: %s\n", lazymig_last_error()), 1;
    lazymig_stats st;
    lazymig_destination_stats(dst, &st);
    lazymig_destination_destroy(dst);
    for (size_t i = 0; i < size / 8; ++i)
        if (ram[i] != pattern(i)) return fprintf(stderr, "destination: word %zu is wrong\n", i), 1;
    printf("destination: %llu pages intact (%llu pushed, %llu demanded), early reads sum %llx\n",
           (unsigned long long)st.pages_present, (unsigned long long)st.pages_pushed,
           (unsigned long long)st.pages_demanded, (unsigned long long)sum);
    return 0;
}

static int source(size_t size, int port_pipe) {
    int fd;
    uint64_t *ram = guest_ram(size, &fd);
    if (!ram) return perror("source: guest RAM"), 1;
    for (size_t i = 0; i < size / 8; ++i) ram[i] = pattern(i);
    char uri[64];
    if (read(port_pipe, uri, sizeof uri) != sizeof uri) return fprintf(stderr, "source: no uri from the child\n"), 1;
    lazymig_region region = {"ram0", ram, size, 4096, LAZYMIG_BACKING_MEMFD, fd, 0};
    lazymig_hooks hooks = {"source", nop, nop, save_state, NULL, on_event};
    lazymig_source *src;
    if (lazymig_source_create_auth(&region, 1, &hooks, uri, LAZYMIG_MODE_POSTCOPY, auth, &src) < 0 ||
        lazymig_source_migrate(src) < 0 || lazymig_source_wait(src) < 0)
        return fprintf(stderr, "source: %s\n", lazymig_last_error()), 1;
    lazymig_stats st;
    lazymig_source_stats(src, &st);
    printf("source: sent %llu bytes, downtime %.2f ms\n", (unsigned long long)st.bytes_sent, st.downtime_ms);
    lazymig_source_destroy(src);
    return 0;
}

int main(int argc, char **argv) {
    size_t size = (size_t)(argc > 1 ? atoi(argv[1]) : 32) << 20;
    int p[2];
    if (make_key() != 0) return 1;
    if (pipe(p) != 0) return perror("pipe"), 1;
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) return perror("fork"), 1;
    if (child == 0) {
        close(p[0]);
        int rc = destination(size, p[1]);
        fflush(stdout);
        _exit(rc);
    }
    close(p[1]);
    int rc = source(size, p[0]);
    unlink(key_file);
    int status;
    if (waitpid(child, &status, 0) < 0) return perror("waitpid"), 1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fprintf(stderr, "destination failed\n"), 1;
    return rc;
}
