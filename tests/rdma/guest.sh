#!/usr/bin/env bash
# Runs one RDMA test program on a real RDMA stack and exits with its exit code.
#
#   tests/rdma/guest.sh [--file PATH]... [--env NAME=VALUE]... -- PROGRAM [ARGS...]
#
# On a host with an RDMA device that rdma_cm can use, set LAZYMIG_RDMA_ADDR to an
# address of that device's netdev and PROGRAM runs here, directly. Otherwise (this
# project's CI: no RDMA hardware, no rdma_rxe in the host kernel) it boots Debian's own
# kernel, which ships the soft-RoCE driver rdma_rxe, under qemu-system-x86_64 with TCG
# and no network at all; inside, rxe0 sits on a dummy netdev with 192.0.2.1, and
# PROGRAM (and every --file, e.g. a peer program it starts) is at the same absolute path
# as here. The guest's serial console is the only way out: its last line
# "lazymig-guest-exit N" carries PROGRAM's exit code (77: skipped).
#
# Cache: LAZYMIG_GUEST_DIR (default $MESON_BUILD_ROOT/rdma-guest, else ./build/rdma-guest)
# holds the extracted kernel package (apt-get download + dpkg -x, never installed) and
# the initramfs. Budget: boot to a ready rxe0 takes 3-5 s under TCG; the guest costs one
# host core while it runs. Set LAZYMIG_GUEST_TIMEOUT (s, default 600) to bound a run.
set -euo pipefail

files=()
envs=()
while [ $# -gt 0 ]; do
    case $1 in
    --file) files+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "guest.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: guest.sh [--file PATH]... -- PROGRAM [ARGS...]" >&2; exit 2; }

if [ -n "${LAZYMIG_SANITIZE:-}" ] && [ "${LAZYMIG_SANITIZE}" != none ] && [ -z "${LAZYMIG_RDMA_ADDR:-}" ]; then
    echo "guest.sh: skipped under b_sanitize=$LAZYMIG_SANITIZE: the RDMA guest runs in the plain build only"
    exit 77
fi
if [ -n "${LAZYMIG_RDMA_ADDR:-}" ]; then
    # Registration pins guest RAM (without ODP): the locked-memory limit must allow it.
    ulimit -l unlimited 2>/dev/null || echo "guest.sh: ulimit -l unlimited refused; locked memory is $(ulimit -l) KiB" >&2
    exec env "${envs[@]}" "$@"
fi

dir=${LAZYMIG_GUEST_DIR:-${MESON_BUILD_ROOT:-$PWD/build}/rdma-guest}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

for tool in qemu-system-x86_64 busybox depmod cpio; do
    command -v "$tool" >/dev/null || { echo "guest.sh: $tool is missing (scripts/setup.sh installs it)"; exit 77; }
done

# The kernel: the package linux-image-amd64 depends on, extracted once.
if [ ! -f "$dir/kernel/.done" ]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "guest.sh: cannot tell which kernel package linux-image-amd64 depends on"; exit 1; }
    rm -rf "$dir/dl" "$dir/kernel"
    mkdir -p "$dir/dl" "$dir/kernel"
    (cd "$dir/dl" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$dir"/dl/*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || { echo "guest.sh: apt-get download $pkg fetched nothing"; exit 1; }
    dpkg -x "$deb" "$dir/kernel"
    touch "$dir/kernel/.done"
fi
kver=$(ls "$dir/kernel/lib/modules" | head -1)
vmlinuz=$(ls "$dir"/kernel/boot/vmlinuz-* | head -1)

# The initramfs: busybox, the modules rxe needs (in load order), iproute2, the verbs
# provider, PROGRAM and the --file programs with every shared library they load.
root="$dir/root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc/libibverbs.d,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for a in sh mount mkdir cat echo modprobe insmod poweroff sleep ls grep seq tr head; do ln -sf busybox "$root/bin/$a"; done
modules=(configfs crc32_generic crc32-pclmul udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe ib_cm iw_cm
         rdma_cm rdma_ucm dummy)
kmod="$dir/kernel/lib/modules/$kver"
mkdir -p "$root/lib/modules/$kver"
cp "$kmod"/modules.order "$kmod"/modules.builtin* "$root/lib/modules/$kver/" 2>/dev/null || true
for m in "${modules[@]}"; do
    f=$(find "$kmod/kernel" -name "$m.ko*" -o -name "${m//-/_}.ko*" | head -1)
    [ -n "$f" ] || { echo "guest.sh: module $m not found in $kmod"; exit 1; }
    mkdir -p "$root/lib/modules/$kver/$(dirname "${f#"$kmod"/}")"
    cp "$f" "$root/lib/modules/$kver/${f#"$kmod"/}"
done
depmod -b "$root" "$kver"

copy_with_libs() {
    local f=$1
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
    { ldd "$f" 2>/dev/null || true; } | awk '/=> \// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        [ -f "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -1)
program=$(command -v "$1")
for f in /usr/sbin/ip /usr/bin/rdma "$program" "${files[@]}" "$provider" \
         /usr/lib/x86_64-linux-gnu/libgcc_s.so.1 $(ls /usr/bin/ib_read_lat /usr/bin/ib_read_bw 2>/dev/null); do
    copy_with_libs "$f"
done
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"

# The program's command line, quoted for the guest's shell.
printf '%q ' env "${envs[@]}" "$program" "${@:2}" >"$root/command"
cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# /tmp stays on the initramfs itself (writable): a tmpfs there would hide the test
# programs when the build tree lives under /tmp.
mount -t tmpfs run /run
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
mount -t configfs none /sys/kernel/config 2>/dev/null
finish() { echo "lazymig-guest-exit $1"; poweroff -f; }
for m in configfs crc32_generic crc32-pclmul udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe ib_cm iw_cm \
         rdma_cm rdma_ucm dummy; do
    modprobe "$m" || { echo "guest: modprobe $m failed"; finish 1; }
done
/usr/sbin/ip link set lo up
/usr/sbin/ip link add lzrdma0 type dummy && /usr/sbin/ip addr add 192.0.2.1/24 dev lzrdma0 &&
    /usr/sbin/ip link set lzrdma0 up || { echo "guest: dummy netdev"; finish 1; }
/usr/bin/rdma link add rxe0 type rxe netdev lzrdma0 || { echo "guest: rdma link add failed"; finish 1; }
# RoCE needs its GID table filled from the netdev's addresses before rdma_cm resolves.
for i in $(seq 1 100); do
    grep -q '0000:0000:0000:0000:0000:ffff:c000:0201' /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null && break
    sleep 0.1
done
echo 1 > /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null
ulimit -l unlimited
export LAZYMIG_RDMA_ADDR=192.0.2.1 LAZYMIG_IN_GUEST=1 HOME=/tmp
cd /tmp
echo "guest: rxe0 ready, running $(cat /command)"
eval "$(cat /command)"
finish $?
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$dir/initramfs.gz"

log="$dir/console.log"
timeout "${LAZYMIG_GUEST_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1536 -nographic -no-reboot \
    -nic none -kernel "$vmlinuz" -initrd "$dir/initramfs.gz" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init" </dev/null | tee "$log" | grep -v '^lazymig-guest-exit' || true
rc=$(tr -d '\r' <"$log" | awk '/^lazymig-guest-exit / {print $2}' | tail -1)
[ -n "$rc" ] || { echo "guest.sh: the guest ended without reporting an exit code (see $log)"; exit 1; }
exit "$rc"
