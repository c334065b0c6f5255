#!/bin/sh
# kmesh.service ExecStopPost: runs after the daemon has exited, however it
# exited.
#
# A clean stop (SIGTERM: systemctl stop/restart) needs nothing from here:
# the daemon itself detaches every program and removes every pin before it
# exits ("off means off").
#
# This script is for the other case: the daemon crashed or was killed
# (SIGKILL, OOM, failed start) and left pins under
# $KMESH_BPF_FS_PATH/bpf_kmesh. By default it does nothing destructive and
# only says so: kmesh "fails static": the pinned programs and maps keep
# redirecting traffic with the last config that was applied, and the next
# start of kmesh-daemon takes them over. Set KMESH_CLEANUP_ON_STOP=1 (in
# /etc/sysconfig/kmesh) to detach and unpin everything instead, so that
# traffic goes the plain kernel path whenever kmesh is not running.
#
#   KMESH_BPF_FS_PATH      bpffs mount point   (default /sys/fs/bpf)
#   KMESH_CLEANUP_ON_STOP  1: run `kmesh-daemon cleanup` when pins are left
#   KMESH_DAEMON           the daemon binary   (default /usr/bin/kmesh-daemon)
#
# systemd passes SERVICE_RESULT, EXIT_CODE and EXIT_STATUS; they are logged.
set -eu

BPF_FS_PATH=${KMESH_BPF_FS_PATH:-/sys/fs/bpf}
CLEANUP=${KMESH_CLEANUP_ON_STOP:-0}
DAEMON=${KMESH_DAEMON:-/usr/bin/kmesh-daemon}
PIN_DIR="$BPF_FS_PATH/bpf_kmesh"

log() { printf 'kmesh-stop-post: %s\n' "$*" >&2; }

if [ ! -d "$PIN_DIR" ]; then
    exit 0
fi

why="result=${SERVICE_RESULT:-unknown} code=${EXIT_CODE:-unknown} status=${EXIT_STATUS:-unknown}"
if [ "$CLEANUP" != 1 ]; then
    log "kmesh-daemon exited without cleaning up ($why); pins left in $PIN_DIR."
    log "failing static: the pinned programs keep traffic flowing with the last applied config until the next start takes them over."
    log "run '$DAEMON -bpf-fs-path $BPF_FS_PATH cleanup' to detach them now, or set KMESH_CLEANUP_ON_STOP=1 in /etc/sysconfig/kmesh."
    exit 0
fi

log "kmesh-daemon exited without cleaning up ($why); KMESH_CLEANUP_ON_STOP=1: detaching and unpinning $PIN_DIR"
exec "$DAEMON" -bpf-fs-path "$BPF_FS_PATH" cleanup
