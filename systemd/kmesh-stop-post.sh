#!/bin/sh
# kmesh.service ExecStopPost (argument: the unit's name, %n). Runs after
# kmesh-daemon has exited, however it exited.
#
# The daemon never removes its pins when it exits: it "fails static", its
# programs and maps stay in force with the last applied config. What happens
# next depends on why the unit stopped, which systemd knows by the job that
# is running:
#
#   restart      (systemctl restart / try-restart / reload-or-restart, an RPM
#                 upgrade): keep everything; the next daemon takes the pins
#                 over without a gap.
#   stop         (systemctl stop, disable --now, shutdown, rpm -e):
#                 KMESH_STOP_MODE=cleanup (default): detach and unpin
#                 everything, "off means off"; KMESH_STOP_MODE=keep: leave the
#                 last config in force until kmesh starts again.
#   no job       the daemon crashed, was killed, or hung and the watchdog
#                 killed it: keep everything ("fail static");
#                 Restart=on-failure starts a daemon that takes it over.
#
#   KMESH_BPF_FS_PATH  bpffs mount point   (default /sys/fs/bpf)
#   KMESH_STOP_MODE    cleanup | keep      (default cleanup)
#   KMESH_DAEMON       the daemon binary   (default /usr/bin/kmesh-daemon)
#   KMESH_SYSTEMCTL    systemctl           (default systemctl)
#
# systemd passes SERVICE_RESULT, EXIT_CODE and EXIT_STATUS; they are logged.
set -eu

UNIT=${1:-kmesh.service}
BPF_FS_PATH=${KMESH_BPF_FS_PATH:-/sys/fs/bpf}
STOP_MODE=${KMESH_STOP_MODE:-cleanup}
DAEMON=${KMESH_DAEMON:-/usr/bin/kmesh-daemon}
SYSTEMCTL=${KMESH_SYSTEMCTL:-systemctl}
PIN_DIR="$BPF_FS_PATH/bpf_kmesh"

log() { printf 'kmesh-stop-post: %s\n' "$*" >&2; }

if [ ! -d "$PIN_DIR" ]; then
    exit 0
fi

case "$STOP_MODE" in
    cleanup|keep) ;;
    *) log "KMESH_STOP_MODE=$STOP_MODE is neither 'cleanup' nor 'keep'; using 'cleanup'"; STOP_MODE=cleanup ;;
esac

# The type of the job running on this unit ("restart", "stop"), if any.
job=$("$SYSTEMCTL" list-jobs --no-legend --plain "$UNIT" 2>/dev/null |
      awk -v u="$UNIT" '$2 == u { print $3; exit }') || job=""
why="job=${job:-none} result=${SERVICE_RESULT:-unknown} code=${EXIT_CODE:-unknown} status=${EXIT_STATUS:-unknown}"

case "$job" in
    restart|try-restart|reload-or-restart)
        log "restarting ($why): the pinned programs keep serving until the new daemon takes them over"
        exit 0 ;;
    stop)
        if [ "$STOP_MODE" = keep ]; then
            log "stopped ($why); KMESH_STOP_MODE=keep: the last config stays in force."
            log "run '$DAEMON -bpf-fs-path $BPF_FS_PATH cleanup' to detach it."
            exit 0
        fi
        log "stopped ($why): detaching and unpinning $PIN_DIR"
        exec "$DAEMON" -bpf-fs-path "$BPF_FS_PATH" cleanup ;;
    *)
        log "kmesh-daemon exited on its own ($why); pins left in $PIN_DIR."
        log "failing static: the pinned programs keep traffic flowing with the last applied config until the next start takes them over."
        log "run '$DAEMON -bpf-fs-path $BPF_FS_PATH cleanup' to detach them now."
        exit 0 ;;
esac
