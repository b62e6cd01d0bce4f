#!/usr/bin/env bash
# Where the CPU of warm reads goes, on this machine, with `perf`: the CSI data path (three
# `lakecache-worker` processes and the `lakecache-csi-node fuse-server`, block transport or gRPC)
# against `lakecache local` (one process, its worker called directly), over a `file://` lake in
# /dev/shm (4 shards of 128 MiB), so no network is involved. A cold pass and three warm passes of
# four `dd` readers (1 MiB reads) each; the third warm pass is recorded system-wide (perf's own
# start and stop make its MB/s meaningless: read the first two).
#
#   bench/profile-warm.sh [blocks|grpc|local]...      (default: all three; needs root and perf)
#
# Prints MB/s and CPU seconds per pass, then the share of samples per process and the top
# symbols; writes perf.data files under $OUT (default /tmp/lakecache-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lakecache/target}"
cargo build --release --locked -q -p lakecache -p lakecache-worker -p lakecache-csi-node
BIN="$CARGO_TARGET_DIR/release"
OUT="${OUT:-/tmp/lakecache-profile}"
LAKE=/dev/shm/lakecache-profile-lake
mkdir -p "$OUT" "$LAKE/shards"
for i in 0 1 2 3; do
    [ -s "$LAKE/shards/s$i" ] || head -c $((128 << 20)) /dev/urandom > "$LAKE/shards/s$i"
done

run() {
    local mode=$1 w="$OUT/work-$1" pids=() members=""
    fusermount3 -u "$w/mnt" 2>/dev/null || true
    rm -rf "$w" && mkdir -p "$w/mnt"
    cleanup() {
        fusermount3 -u "$w/mnt" 2>/dev/null || umount -l "$w/mnt" 2>/dev/null || true
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        rm -rf "/dev/shm/lakecache-profile-tiers-$mode"
    }
    trap cleanup RETURN
    if [ "$mode" = local ]; then
        RUST_LOG=warn "$BIN/lakecache" local --source "file://$LAKE" --mount "$w/mnt" \
            --workers 1 --memory 1GiB > "$w/local.log" 2>&1 &
        pids+=($!)
    else
        echo profile-token > "$w/token" && chmod 600 "$w/token"
        for i in 0 1 2; do
            cat > "$w/w$i.json" <<EOF
{"id":"w$i","source":{"uri":"file://$LAKE"},"listen":"127.0.0.1:0","adminListen":"127.0.0.1:0",
 "tiers":[{"kind":"Memory","path":"/dev/shm/lakecache-profile-tiers-$mode/w$i","size":"1GiB"}],
 "tokenFile":"$w/token"}
EOF
            LAKECACHE_LOG_FORMAT=json RUST_LOG=warn,lakecache_worker=info \
                "$BIN/lakecache-worker" --config "$w/w$i.json" > "$w/w$i.log" 2>&1 &
            pids+=($!)
        done
        for i in 0 1 2; do
            for _ in $(seq 100); do grep -q '"worker ready"' "$w/w$i.log" && break; sleep 0.1; done
            local addr
            addr=$(grep '"worker ready"' "$w/w$i.log" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
            members="$members{\"id\":\"w$i\",\"endpoint\":\"http://$addr\"},"
        done
        local bt=true
        [ "$mode" = grpc ] && bt=false
        cat > "$w/fuse.json" <<EOF
{"volumeId":"profile","mountPath":"$w/mnt","namespace":"p","name":"p","workers":[${members%,}],
 "token":"profile-token","metadataTtl":null,"prefetchBudget":536870912,"fuseThreads":2,
 "startupTimeout":"30s","blockTransport":$bt}
EOF
        RUST_LOG=warn "$BIN/lakecache-csi-node" fuse-server --config "$w/fuse.json" > "$w/fuse.log" 2>&1 &
        pids+=($!)
    fi
    for _ in $(seq 100); do mountpoint -q "$w/mnt" && break; sleep 0.1; done
    mountpoint -q "$w/mnt"
    local cpu_of="${pids[*]}" roles
    if [ "$mode" = local ]; then
        roles="${pids[0]} lakecache local"
    else
        roles="${pids[0]} ${pids[1]} ${pids[2]} workers, ${pids[3]} fuse-server"
    fi
    cpu() { # CPU seconds of the processes, summed
        local s=0 p
        for p in $cpu_of; do
            s=$(awk -v s="$s" '{sub(/.*\) /,""); print s + ($12 + $13) / 100}' "/proc/$p/stat")
        done
        echo "$s"
    }
    local pass
    for pass in 0 1 2 3; do
        sync && echo 3 > /proc/sys/vm/drop_caches
        local c0 t0 t1 c1 rec=()
        c0=$(cpu)
        [ "$pass" = 3 ] && rec=(perf record -q -F 999 -g -a -o "$OUT/perf-$mode.data" --)
        t0=$(date +%s.%N)
        "${rec[@]}" bash -c "for i in 0 1 2 3; do dd if='$w/mnt/shards/s'\$i of=/dev/null bs=1M status=none & done; wait" 2>/dev/null
        t1=$(date +%s.%N)
        c1=$(cpu)
        awk -v m="$mode" -v p="$pass" -v a="$t0" -v b="$t1" -v c="$c0" -v d="$c1" 'BEGIN {
            printf "%-6s %s: %6.0f MB/s, %.2f CPU s\n", m, (p == 0 ? "cold  " : (p == 3 ? "warm 3 (under perf)" : "warm " p)), 536.870912 / (b - a), d - c }'
    done
    echo "  samples by process (pass 3, whole machine; pids: $roles):"
    perf report -i "$OUT/perf-$mode.data" --no-children -g none --sort pid --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -8 | sed 's/^/  /' || true
    echo "  top symbols:"
    perf report -i "$OUT/perf-$mode.data" --no-children -g none --sort dso,sym --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -14 | sed 's/^/  /' || true
}

modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(blocks grpc local)
for m in "${modes[@]}"; do
    case "$m" in
        blocks|grpc|local) run "$m" ;;
        *) echo "unknown mode $m: blocks, grpc or local" >&2; exit 2 ;;
    esac
done
