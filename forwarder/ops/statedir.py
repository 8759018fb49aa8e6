"""The state directory: checked before use, locked by one process, its files opened safely.

`state.dir` holds the spool (`spool.db` and its `-wal`/`-shm`), the PID file, the lock file and,
from older versions, `pending.jsonl`. Every file forwarder creates, writes or reads there goes
through `open_state_file` (O_NOFOLLOW: a symbolic link planted at one of our names is refused,
never followed) or `replace_state_file` (a fresh name, created O_EXCL, renamed over the old
one: a rename replaces a link itself, never its target). SQLite opens the spool's files itself,
so `storage/sqlite/opening.py` refuses links at those names before it opens them.

The daemon refuses a state dir that another user could write to (writable by group or others,
or owned by another user): such a user could plant links or files there faster than any check.
And one process at a time uses a state dir: `StateLock` is an exclusive `flock` on
`forwarder.lock`, held for the daemon's life (and by `forwarder spool recover`), with the
holder's PID written in it, so a second daemon exits naming the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path

LOCK_FILE = "forwarder.lock"
# How long a process that finds the lock taken waits for its holder to write its PID (it does
# so right after locking).
_HOLDER_WAIT_S = 0.5


class StateDirError(OSError):
    """The state dir, or a file in it, cannot be used safely; the message says which and why."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "state dir error"


class StateDirLocked(StateDirError):
    """Another process holds the state dir's lock (`pid` is its PID, or None if unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def open_state_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """`os.open` for a file in state.dir that never follows a symbolic link; returns the fd.

    Use it for every state file forwarder creates, writes or reads: O_NOFOLLOW and O_CLOEXEC are
    added to `flags`, and a file it creates gets `mode` (0600 unless told otherwise; the umask
    can only narrow it). A link at `path` raises StateDirError naming it; other errors are the
    usual OSErrors.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateDirError(f"{path} is a symbolic link (not followed; remove it)") from None
        raise


def read_state_file(path: Path, limit: int = 1 << 16) -> bytes:
    """The first `limit` bytes of a small state file, read without following a link."""
    fd = open_state_file(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def replace_state_file(path: Path, data: bytes) -> None:
    """Write `data` as `path` (mode 0600): a fresh file, fsynced, then renamed over `path`.

    The new file gets a name nobody can have planted (mkstemp: O_EXCL, O_NOFOLLOW), and the
    rename replaces whatever `path` was (a link included) without touching what it pointed to.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_state_dir(path: Path) -> None:
    """Create state.dir (mode 0700) if needed, refuse an unsafe one, and check it is writable.

    Refused (StateDirError, naming the dir and the fix): not a directory, writable by group or
    others, or owned by a user other than this process's. A link to a directory is followed
    (an administrator's choice); what it points to is checked.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state.dir {path} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = " and ".join(
            name for bit, name in ((0o020, "group"), (0o002, "others")) if mode & bit
        )
        raise StateDirError(
            f"state.dir {path} is writable by {who} (mode {mode:04o}): another user could plant"
            f" links or files in it; make it 0700 (chmod go-w {path})"
        )
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"state.dir {path} belongs to uid {info.st_uid}, not to this process's user"
            f" (uid {os.geteuid()}): run forwarder as its owner, or chown it"
        )
    # The write test under a fresh name: a fixed one could be a planted link.
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.unlink(probe)


class StateLock:
    """An exclusive `flock` on `state.dir/forwarder.lock`: one process uses the state dir.

    Taken with `StateLock.acquire` before the spool is opened, and held until `release` (the
    daemon: for its whole life). The lock file is never removed (a process could otherwise lock
    a new file while another still holds the old one); it holds the holder's PID and what it
    is, for the message of whoever finds it taken. The fd is close-on-exec, so no child process
    inherits the lock.
    """

    def __init__(self, fd: int, path: Path) -> None:
        """Use `StateLock.acquire`."""
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path, holder: str) -> StateLock:
        """Lock `state_dir` for this process (`holder`, e.g. "forwarder run"), without waiting.

        Raises StateDirLocked, naming the PID that holds it, if another process does. Blocking
        (file I/O, and a short wait for a holder that has not written its PID yet).
        """
        path = state_dir / LOCK_FILE
        fd = open_state_file(path, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, what = _holder(fd)
                held_by = f"PID {pid}" if pid is not None else "a process whose PID is unknown"
                raise StateDirLocked(
                    f"state.dir {state_dir} is in use by another forwarder: {held_by}"
                    f"{f' ({what})' if what else ''} holds the lock {path}",
                    pid,
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        """Give the lock up (closing the fd does); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def lock_holder(state_dir: Path) -> int | None:
    """The PID written in the state dir's lock file, if any (it may have exited since)."""
    try:
        pid, _what = _parse(read_state_file(state_dir / LOCK_FILE))
    except OSError:
        return None
    return pid


def running_holder(state_dir: Path) -> int | None:
    """The PID in the state dir's lock file if that process still runs forwarder, else None.

    For the commands that work beside a running daemon (`dlq replay`, `dlq purge`): they read
    the lock file rather than take the lock, which, even for a moment, could make a daemon that
    starts just then refuse to.
    """
    pid = lock_holder(state_dir)
    if pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"forwarder" in cmdline else None


def _holder(fd: int) -> tuple[int | None, str]:
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        pid, what = _parse(os.pread(fd, 4096, 0))
        if pid is not None or time.monotonic() >= deadline:
            return pid, what
        time.sleep(0.02)  # it locked the file and is writing its PID right now


def _parse(data: bytes) -> tuple[int | None, str]:
    first, _, rest = data.decode("ascii", "replace").strip().partition(" ")
    return (int(first), rest.strip()) if first.isdigit() else (None, "")
