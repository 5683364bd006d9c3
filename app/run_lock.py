"""One run per output: a lock file that names its holder.

Why: two runs writing one `output_dir` would both see the same problems as pending and solve them twice (each
record appended by both), and a sweep's trials would be claimed twice. A run takes `<output>/.ponder-run.lock`
(holder host, pid, job, start time) before it writes anything; a second run on the same output is refused in one
line naming the holder. A lock whose holder is gone (same host, pid no longer alive: a job killed with SIGKILL, a
machine that rebooted) is taken over with a note. On another host the holder's life cannot be checked, so its
lock is refused with the command that clears it.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from app.config import ConfigError

LOCK_NAME = ".ponder-run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _boot_id() -> str:
    """Changes at every boot, so a pid from before a reboot is never taken for a live process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class RunLock:
    """`with RunLock(path_of_lock, job="search"):` holds the lock for the block (and is released at exit if the
    process ends first). `path` is the lock file itself: `RunLock.for_dir(output_dir, ...)` for folder outputs."""

    def __init__(self, path: str | os.PathLike, job: str, key: str = "output_dir"):
        self.path, self.job, self.key = Path(path), job, key
        self.held = False

    @classmethod
    def for_dir(cls, out_dir: str | os.PathLike, job: str, key: str = "output_dir") -> "RunLock":
        return cls(Path(out_dir) / LOCK_NAME, job, key)

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(), "job": self.job,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or unreadable: a holder we cannot describe

    def _stale(self, info: dict) -> bool:
        if not info:
            return False
        same_host = info.get("host") == socket.gethostname()
        if not same_host:
            return False
        if info.get("boot_id") and info.get("boot_id") != _boot_id():
            return True
        return not _alive(int(info.get("pid", -1)))

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(self._mine())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue  # released between our two looks: try again
                if not self._stale(info):
                    raise ConfigError(self._refusal(info)) from None
                print(f"note: taking over the lock of a run that is gone ({self._describe(info)}): {self.path}",
                      file=sys.stderr)
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
                tmp.write_text(mine)
                os.replace(tmp, self.path)
                if self.holder() != json.loads(mine):
                    continue  # another run took it over at the same moment: look again
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(mine)
            self.held = True
            atexit.register(self.release)
            return self
        raise ConfigError(self._refusal(self.holder() or {}))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self.holder()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _describe(info: dict) -> str:
        if not info:
            return "holder unknown"
        return f"{info.get('job', '?')} pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"

    def _refusal(self, info: dict) -> str:
        return (f"{self.key}: {str(self.path.parent)!r} is in use by another run ({self._describe(info)}); wait for "
                f"it to finish or give another {self.key}; if that run is gone, delete {self.path}")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
