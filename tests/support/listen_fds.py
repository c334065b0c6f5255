#!/usr/bin/env python3
"""Start a program the way systemd passes it stored descriptors:

    listen_fds.py FD[,FD...] NAME[:NAME...] -- ARGV...

moves the inherited FDs to 3, 4, ... and sets LISTEN_FDS, LISTEN_FDNAMES and
LISTEN_PID (this process: exec keeps it) before exec'ing ARGV."""
import fcntl
import os
import sys


def main() -> None:
    fds = [int(x) for x in sys.argv[1].split(",") if x]
    names = sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    # Move them out of the way first, then into place (an FD may already sit
    # where another has to go).
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
