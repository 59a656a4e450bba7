"""One sweep per output folder at a time: an OS-level lock (`flock`) on `<out>/.sweep.lock`.

The lock belongs to the open file, so it dies with the process that holds it, however that process
ends (SIGKILL included): a lock left by a killed sweep never blocks the next one. The holder's pid is
written in the file, so a refused sweep can say who holds the folder.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Self

LOCK_NAME = ".sweep.lock"


class FolderLocked(ValueError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, holder: int | None) -> None:
        self.folder, self.holder = folder, holder
        who = f"pid {holder}" if holder else "another process"
        super().__init__(
            f"--out {folder} is in use by another sweep ({who}); wait for it to finish, stop it, or use another --out"
        )


class SweepLock:
    """`with SweepLock(out):` holds `<out>/.sweep.lock` (non-blocking: raises `FolderLocked` at once)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise FolderLocked(self.folder, holder) from None
            # The holder before us may have unlinked the file between our open and our flock: then we
            # hold a lock on a file nobody else will see. Lock the file that is at the path instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: the next sweep creates a fresh one
        os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
