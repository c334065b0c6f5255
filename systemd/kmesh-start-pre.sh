#!/bin/sh
# kmesh.service ExecStartPre: make sure bpffs and cgroup2 are mounted where
# kmesh-daemon expects them, before the daemon starts.
#
#   KMESH_BPF_FS_PATH   bpffs mount point        (default /sys/fs/bpf)
#   KMESH_CGROUP2_PATH  cgroup2 kmesh governs    (default /mnt/kmesh_cgroup2)
#   KMESH_RUN_DIR       where the record is kept (default /run/kmesh)
#
# A path that is already on the right filesystem is left alone. Every mount
# this script makes is appended to $KMESH_RUN_DIR/mounts-made (one path per
# line, no duplicates), so an uninstall can unmount exactly what kmesh
# mounted and nothing that was there before it. /run is a tmpfs: the record
# and the mounts both go away at reboot.
#
# The filesystem test is the daemon's (kmesh/mounts.py): the mount in
# /proc/self/mountinfo with the longest prefix of the path wins, and of
# stacked mounts on the same point the last one listed (the top one).
set -eu

BPF_FS_PATH=${KMESH_BPF_FS_PATH:-/sys/fs/bpf}
CGROUP2_PATH=${KMESH_CGROUP2_PATH:-/mnt/kmesh_cgroup2}
RUN_DIR=${KMESH_RUN_DIR:-/run/kmesh}
RECORD="$RUN_DIR/mounts-made"

log() { printf 'kmesh-start-pre: %s\n' "$*" >&2; }

# fs_type PATH: the filesystem type PATH is on (PATH must exist).
fs_type() {
    real=$(cd "$1" && pwd -P)
    awk -v p="$real" '
        function unescape(s) {
            gsub(/\\040/, " ", s); gsub(/\\011/, "\t", s); gsub(/\\012/, "\n", s)
            return s
        }
        {
            mnt = unescape($5)
            for (i = 7; i < NF; i++) if ($i == "-") { t = $(i + 1); break }
            pre = mnt; sub(/\/$/, "", pre)
            if ((p == mnt || index(p, pre "/") == 1) && length(mnt) >= length(best)) {
                best = mnt; type = t
            }
        }
        END { print type }
    ' /proc/self/mountinfo
}

record() {
    mkdir -p "$RUN_DIR"
    if ! grep -qxF "$1" "$RECORD" 2>/dev/null; then
        printf '%s\n' "$1" >> "$RECORD"
    fi
}

# ensure PATH FSTYPE SOURCE
ensure() {
    path=$1 want=$2 source=$3
    if ! mkdir -p "$path"; then
        log "cannot create $path"
        return 1
    fi
    have=$(fs_type "$path")
    if [ "$have" = "$want" ]; then
        log "$path is already $want"
        return 0
    fi
    log "$path is ${have:-unknown}, not $want: mounting $want there"
    if ! mount -t "$want" "$source" "$path"; then
        log "mount -t $want $source $path failed (kmesh needs root with CAP_SYS_ADMIN)"
        return 1
    fi
    record "$path"
}

ensure "$BPF_FS_PATH" bpf bpf
ensure "$CGROUP2_PATH" cgroup2 none
