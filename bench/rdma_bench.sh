#!/bin/sh
# Runs inside the soft-RoCE guest (tests/rdma/guest.sh; busybox sh) or on a host with
# RDMA: post-copy over rdma: beside the verbs floors measured on the same device now.
#   rdma_bench.sh PEER SIZE_MIB
# Prints "rdma-bench KEY=VALUE ..." lines; the last one carries every figure.
peer=$1 size=${2:-128}
# The migration's key, as every lazymig migration is authenticated (TLS 1.3 on the
# control channels; the pages move by RDMA READ).
key=/tmp/rdma-bench.psk
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$key")
addr=${LAZYMIG_RDMA_ADDR:-192.0.2.1}
dev=$(ls /sys/class/infiniband | head -1)
gid=$(grep -l "ffff:$(printf '%02x%02x:%02x%02x' $(echo "$addr" | tr . ' '))" \
      /sys/class/infiniband/"$dev"/ports/1/gids/* 2>/dev/null | head -1 | sed 's|.*/||')
gid=${gid:-1}

# Floors: one-sided READ latency (4 KiB, a page) and bandwidth (1 MiB messages).
ib_read_lat -d "$dev" -x "$gid" -s 4096 -n 1000 >/tmp/lat.srv 2>&1 &
sleep 1
lat=$(ib_read_lat -d "$dev" -x "$gid" -s 4096 -n 1000 "$addr" 2>&1 | awk '$1 == 4096 {print $5, $8}')
wait
ib_read_bw -d "$dev" -x "$gid" -s 1048576 -n 200 >/tmp/bw.srv 2>&1 &
sleep 1
bw=$(ib_read_bw -d "$dev" -x "$gid" -s 1048576 -n 200 "$addr" 2>&1 | awk '$1 == 1048576 {print $4}')
wait
echo "rdma-bench floor ib_read_lat_4k_typical_us=${lat% *} ib_read_lat_4k_p99_us=${lat#* } ib_read_bw_MBps=$bw"

# One migration per transport and backing: 4 workers fault at random while the bulk pull
# runs; then one without workers for the bulk rate alone.
run() {  # uri backing workers
    "$peer" dest --size "$size" --backing "$2" --seed 5 --workers "$3" --uri "$1" --psk-file "$key" >/tmp/dst.out 2>/tmp/dst.err &
    dpid=$!
    for i in $(seq 1 100); do grep -q '^uri ' /tmp/dst.out && break; sleep 0.1; done
    to=$(awk '/^uri / {print $2}' /tmp/dst.out)
    "$peer" source --size "$size" --backing "$2" --seed 5 --uri "$to" --psk-file "$key" >/tmp/src.out 2>/tmp/src.err
    wait $dpid
    grep -q 'wrong_units=0' /tmp/dst.out || { echo "rdma-bench FAILED $1 $2"; cat /tmp/dst.out /tmp/dst.err; exit 1; }
    sed -n 's/^stats .*fault_p50_us=\([0-9]*\) fault_p99_us=\([0-9]*\) postcopy_ms=\([0-9]*\).*/\1 \2 \3/p' /tmp/dst.out
}
for b in memfd anon; do
    set -- $(run "rdma:$addr:0" $b 4)
    f50=$1 f99=$2
    set -- $(run "rdma:$addr:0" $b 0)
    mbps=$(( size * 1000 / ($3 > 0 ? $3 : 1) ))
    set -- $(run "tcp:$addr:0" $b 4)
    echo "rdma-bench $b rdma_fault_p50_us=$f50 rdma_fault_p99_us=$f99 rdma_bulk_MBps=$mbps tcp_fault_p50_us=$1 tcp_fault_p99_us=$2"
done
