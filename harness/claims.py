"""Claims: one process at a time computes a run (or a calibration) of a results directory.

Two drivers on one results directory (two terminals, two jobs of a cluster) share its matrix: each run is
claimed before it is computed, and a claimed run is left to its holder. A claim is an exclusive
`fcntl.flock` on `<results>/claims/<name>.lock`. The kernel drops the lock when its holder exits, however it
exits (kill -9 included), so there is no stale-lock rule to get wrong: a claim is held exactly while its
holder lives. The lock file names the holder (host, pid, time) for people looking at a stuck directory.

flock works across processes of one machine and over NFSv4 (Linux maps it to POSIX byte-range locks there);
on a filesystem without locks, claiming fails open: the run is computed, as before claims existed.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path


class Claim:
    """An exclusive claim on one name under a claims directory; `acquire()` / `release()` or `with`."""

    def __init__(self, directory: str | os.PathLike, name: str):
        self.path = Path(directory) / f"{name}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the claim if nobody holds it; False (at once) if another process does."""
        if self._fd is not None:
            return True
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError:
                return True  # nowhere to keep claims: compute (the pre-claims behaviour) rather than stall
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # no lock support here
                os.close(fd)
                return True
            # The holder before us may have unlinked the file after we opened it: our lock would then be on
            # a file nobody else sees. Keep it only if the path still names the file we locked.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"host": platform.node(), "pid": os.getpid(),
                                         "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
                return True
            os.close(fd)

    def acquire(self, poll_s: float = 0.5, on_wait=None) -> None:
        """Take the claim, waiting while another process holds it (`on_wait()` is called once, first)."""
        waited = False
        while not self.try_acquire():
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it re-checks the inode
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
