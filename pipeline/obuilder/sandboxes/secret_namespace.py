"""Runs a program (runc) in a private mount namespace where a step's secrets are files on a tmpfs.

    python -I secret_namespace.py LOG DIR UID GID FD... -- PROGRAM ARG...

The process leaves the host's mount namespace, mounts a fresh tmpfs on the (empty) directory
DIR, copies each secret from its inherited descriptor FD (a memfd made by the sandbox) to
`DIR/0`, `DIR/1`, ... (mode 0400, owned by UID:GID), closes the descriptors and becomes
PROGRAM. The tmpfs is visible to no other process: runc, starting in this namespace, bind-mounts
the files into the container, and the tmpfs goes away with the last process of the namespace,
whatever happens to the builder (even SIGKILL). No secret ever has a name on the host.

On failure it writes one error line in runc's JSON log format to LOG (where the sandbox looks
for runc's own errors) and exits with status 1. It imports only the standard library, so it
starts quickly and is run as a file (never `-m`, which would import from the current
directory).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _write_secret(directory: str, name: str, source_fd: int, uid: int, gid: int) -> None:
    """Copy the whole of `source_fd` into the new file `directory/name`, then close it."""
    fd = os.open(os.path.join(directory, name),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        offset = 0
        while chunk := os.pread(source_fd, 1 << 20, offset):
            os.write(fd, chunk)
            offset += len(chunk)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
        os.close(source_fd)


def main(argv: list[str]) -> None:
    """Set up the namespace described by `argv` (as in the module docstring) and exec."""
    split = argv.index("--")
    log, directory, uid, gid, *fds = argv[:split]
    program = argv[split + 1:]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc.unshare(_CLONE_NEWNS), "unshare")
        # Nothing mounted here may propagate back to the host.
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        _check(libc.mount(b"obuilder-secrets", directory.encode(), b"tmpfs",
                          _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0700"),
               f"mount tmpfs on {directory}")
        for n, fd in enumerate(fds):
            _write_secret(directory, str(n), int(fd), int(uid), int(gid))
        os.execv(program[0], program)
    except OSError as exc:
        with open(log, "a") as file:
            file.write(json.dumps({"level": "error",
                                   "msg": f"cannot set up the secrets: {exc.strerror}"}) + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
