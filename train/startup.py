"""A training worker's start that can neither wedge on a stale build lock nor hang in silence.

Why: on CPU, `deepspeed.initialize` JIT-compiles DeepSpeed's shared-memory comm op into torch's extension cache
(`$TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions/<py>_cpu/deepspeed_shm_comm/`) under a `lock` file that
torch's `FileBaton` waits on forever, with no check that its owner lives. A run killed during that build leaves the
lock behind and every later training run on the machine waits, printing nothing. Training needs no such op: gloo
(or NCCL) carries every collective DeepSpeed runs for training; the shm op serves only its inference all-reduce
(`inference_all_reduce`, AutoTP inference), which falls back to the process group without it. So ponder's workers
never build it (`skip_runtime_op_builds`), and a `StartWatchdog` turns any other stall before the first optimizer
step (another runtime build, a peer that never arrives, a model that loads forever) into an error that names the
rank, what it was doing, any build lock in the extension cache, and the fix.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import time
from pathlib import Path


class StalledStart(RuntimeError):
    """A training worker did not reach its first optimizer step within `train.start_timeout_s`."""


class _Stall(BaseException):
    """What the watchdog throws into the stalled thread: a BaseException, so no library's `except Exception`
    swallows it on the way out; the worker turns it into `StalledStart` with the message."""


def skip_runtime_op_builds() -> None:
    """Keep DeepSpeed from compiling its shared-memory comm op when the backend starts (see the module doc).

    `deepspeed.comm.torch.TorchBackend.__init__` calls the module function `build_shm_op()` and treats None as
    "no op" (the path DeepSpeed takes itself where the op is incompatible); replacing the function is the one
    switch DeepSpeed 0.19 leaves, since `deepspeed.ops.__compatible_ops__` probes every op with a compiler first."""
    import importlib

    try:  # by module path: `deepspeed.comm.torch` as an attribute is the torch library itself
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # a DeepSpeed without this module builds no shm op either
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = _no_shm_op


def _no_shm_op():
    return None


def extension_root() -> Path:
    """torch's JIT extension cache: where a runtime build takes its lock."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks() -> list[Path]:
    """The `lock` files of runtime builds in the extension cache (its own folder and one level of `<py>_<accel>/`)."""
    root = extension_root()
    found = set(glob.glob(str(root / "*" / "lock"))) | set(glob.glob(str(root / "*" / "*" / "lock")))
    return sorted(Path(p) for p in found)


def describe_stall(rank: int, world: int, waited_s: float, phase: str) -> str:
    """One paragraph: which rank, how long, doing what, and the fix."""
    msg = (f"training worker rank {rank} of {world} has not finished its first optimizer step after {waited_s:.0f} s; "
           f"it is {phase}")
    locks = build_locks()
    if locks:
        ages = ", ".join(f"{p} ({time.time() - p.stat().st_mtime:.0f} s old)" for p in locks if p.exists())
        msg += (f". A torch extension build lock is held: {ages}. A build killed mid-way leaves its lock behind and "
                f"torch waits on it forever: if no other build is running, delete it (rm {' '.join(map(str, locks))}) "
                "and run again")
    elif "first optimizer step" in phase and world > 1:
        msg += (". A peer rank that has not arrived blocks every collective: see the other ranks' messages, and "
                "check that every worker's node can reach the others (the gloo/NCCL rendezvous)")
    return msg + ". Raise train.start_timeout_s if the start is just slow (a big model loading)."


class StartWatchdog:
    """Watches one worker's start: `phase(text)` says what it is doing; `started()` after its first optimizer step
    disarms it. Past `timeout_s` it raises `StalledStart` in the watched thread (delivered at the next Python
    bytecode, e.g. inside torch's `FileBaton.wait` polling loop). A thread stuck inside a C call (a collective
    waiting on a peer) cannot take it: `hard_exit_s` later the watchdog prints the message and ends the process, so
    Ray Train sees the worker die rather than a group that never moves."""

    def __init__(self, timeout_s: float, rank: int = 0, world: int = 1, hard_exit_s: float | None = 60.0,
                 thread_id: int | None = None):
        self.timeout_s, self.rank, self.world, self.hard_exit_s = timeout_s, rank, world, hard_exit_s
        self.thread_id = thread_id or threading.get_ident()
        self.message: str | None = None
        self._phase = "starting"
        self._t0 = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name=f"ponder-start-watchdog-r{rank}", daemon=True)

    def __enter__(self) -> "StartWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.started()

    def phase(self, text: str) -> None:
        self._phase = text

    def started(self) -> None:
        with self._lock:  # never after the watchdog fired: then the thread is already on its way out
            self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        with self._lock:
            if self._done.is_set():
                return
            self.message = describe_stall(self.rank, self.world, time.monotonic() - self._t0, self._phase)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), ctypes.py_object(_Stall))
        if self.hard_exit_s is None or self._done.wait(self.hard_exit_s):
            return
        print(f"error: {self.message}", file=sys.stderr, flush=True)
        os._exit(3)

    def error(self) -> StalledStart:
        """The exception to raise in place of the bare `_Stall` delivered to the thread (it carries no message)."""
        return StalledStart(self.message or describe_stall(self.rank, self.world, time.monotonic() - self._t0,
                                                           self._phase))


def error_chain(error: BaseException | None):
    """Every exception inside `error`, however Ray wrapped it: causes, contexts, a RayTaskError's `cause`, and a
    Ray Train error's worker failures or controller failure; each once."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += list(getattr(e, "worker_failures", {}).values())
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]


def stalled_start_in(error: BaseException | None) -> str | None:
    """The message of a `StalledStart` inside a Ray Train error (a worker's failure), else None."""
    for e in error_chain(error):
        if isinstance(e, StalledStart):
            return str(e)
        text = str(e)
        if "StalledStart: " in text:  # a worker's exception that came back only as its traceback's text
            return text.split("StalledStart: ", 1)[1].strip().splitlines()[0]
    return None
