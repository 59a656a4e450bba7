"""The lock that keeps one sweep per output folder: exclusive, named after its holder, gone with it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from amp_lib.sweep.lock import LOCK_NAME, FolderLocked, SweepLock

# A killed holder blocking nothing, and the CLI's refusal naming the holder: tests/test_sweep_cli.py.


def test_the_lock_is_exclusive_within_a_process_too_and_reusable_after_release(tmp_path: Path) -> None:
    with SweepLock(tmp_path) as first:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(FolderLocked, match=rf"in use by another sweep \(pid {os.getpid()}\)"):
            SweepLock(tmp_path).acquire()  # flock locks belong to the open file, not the process
    assert first._fd is None and not (tmp_path / LOCK_NAME).exists()
    with SweepLock(tmp_path):
        pass
    first.release()  # releasing twice is harmless


def test_a_holder_whose_pid_cannot_be_read_is_called_another_process(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("not a pid\n")  # e.g. a holder that had not written its pid yet
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FolderLocked) as info:
            SweepLock(tmp_path).acquire()
    finally:
        os.close(fd)
    assert info.value.holder is None and info.value.folder == tmp_path
    assert str(info.value) == (
        f"--out {tmp_path} is in use by another sweep (another process); wait for it to finish, stop it, or use "
        "another --out"
    )
    assert (tmp_path / LOCK_NAME).read_text() == "not a pid\n"  # the refused sweep touched nothing


def test_the_lock_file_holds_only_the_holders_pid_whatever_a_dead_holder_left_in_it(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("123456789\nand a longer line a crashed writer left behind\n")
    with SweepLock(tmp_path) as lock:
        assert lock.path == tmp_path / LOCK_NAME
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner_alone(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # the usual one; the mode asked for is 0o644 whatever the umask lets through
    try:
        with SweepLock(tmp_path):
            assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_release_is_harmless_before_acquire_and_after_the_lock_file_was_removed(tmp_path: Path) -> None:
    SweepLock(tmp_path).release()  # never acquired: nothing to close
    lock = SweepLock(tmp_path)
    lock.acquire()
    (tmp_path / LOCK_NAME).unlink()  # e.g. someone cleaned the folder while the sweep ran
    lock.release()
    with SweepLock(tmp_path):  # and the folder can be locked again
        pass
