"""Owns every long-lived child process lab/ starts: broker, link proxies, agents, planners.

One class, :class:`Supervised`, holds a child's whole life, in the manner of supervisord:

* **Start** in its own session and process group (``start_new_session``), so a Ctrl-C
  in the terminal reaches only our process, which then stops the children in order,
  and a stop reaches everything the child forked. Output goes to a log file (kept
  when the caller names one, else a temp file deleted on stop).
* **Readiness**: :meth:`Supervised.start` returns once a line appears in the log, a TCP
  port accepts connections, or a callable says so. A child that exits first, or is
  not ready in time, is stopped and reported with the tail of its log.
* **Stop**: SIGTERM to the whole group, a grace period for the leader *and* whatever it
  forked, then SIGKILL to the group. Safe to call twice.
* **Leftovers**: ``atexit`` stops children still running at a normal interpreter exit.
  If our process is killed outright (SIGKILL, crash) there is no atexit, so on Linux
  each child asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``
  via ctypes in ``preexec_fn``, then a ``getppid`` check for a parent that died before
  the call). The kernel ties that signal to the forking *thread*, so it is only set up
  when the child is started from the main thread; children that can watch for
  themselves (the amqtt runner, link proxies) also get ``--parent-pid`` and poll it.
* **Detached** children (``detached=True``, used by ``edgeslice testbed up``, whose
  fleet outlives the command) get neither: they run until someone stops them, by
  object or by the pids recorded in a state file (:func:`stop_groups`).

SIGINT and SIGTERM are blocked in our process (main thread) between the fork and the
moment the child is recorded, so a Ctrl-C cannot land in between and orphan it; the
child's signal mask is restored before it runs the command.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

from edgeslice.broker.protocol.errors import EdgesliceError

logger = logging.getLogger(__name__)

Ready = str | tuple[str, int] | Callable[[], bool] | None
"""A log line to wait for, a (host, port) to connect to, a callable, or None (no wait)."""

LOG_TAIL_BYTES = 3000
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_running: set[Supervised] = set()  # started, attached, not stopped: the atexit list


class Supervised:
    """One child process, from start to stop (see the module docstring)."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        detached: bool = False,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.detached = detached
        self.returncode: int | None = None
        self._log_path = str(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id) while started, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> str | None:
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, ready: Ready = None, timeout: float = 10.0) -> Supervised:
        """Start the command and wait until ``ready``; EdgesliceError with the log tail if not."""
        if not self.is_running():
            self.spawn()
            self.wait_ready(ready, timeout)
        return self

    def wait_ready(self, ready: Ready, timeout: float = 10.0) -> None:
        """Wait until ``ready``; if the child exits first or is late, stop it and raise."""
        try:
            self._wait_ready(ready, timeout)
        except EdgesliceError as exc:
            tail = self.log_tail()
            self.stop(grace=2.0)
            raise EdgesliceError(f"{exc}\n--- {self.name} log tail ---\n{tail}") from None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit; its return code, or None on timeout (or if not started)."""
        if self._proc is None:
            return self.returncode
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (nothing if it is gone)."""
        if self._proc is not None:
            _killpg(self._proc.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, SIGKILL after ``grace`` s; the exit code. Safe to call twice."""
        self.signal(signal.SIGTERM)
        return self._finish(time.monotonic() + grace)

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        """The last ``limit`` bytes of the child's output (empty if there is none)."""
        if self._log_path is None or not os.path.exists(self._log_path):
            return ""
        with open(self._log_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(self._log_path) - limit))
            return fh.read().decode("utf-8", "replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------
    def spawn(self) -> None:
        """Start the command without waiting (see :meth:`start`)."""
        if self._log_path is None:
            fd, self._log_path = tempfile.mkstemp(prefix=f"edgeslice-{self.name}-", suffix=".log")
            os.close(fd)
        main = threading.current_thread() is threading.main_thread()
        watch = not self.detached and main and sys.platform.startswith("linux")
        logger.debug("starting %s: %s", self.name, shlex.join(self.cmd))
        with open(self._log_path, "ab") as log, _signals_deferred(main) as mask:
            try:
                self._proc = subprocess.Popen(
                    self.cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_child_setup(mask, os.getpid() if watch else None),
                )
            except OSError as exc:
                raise EdgesliceError(
                    f"cannot start {self.name} ({shlex.join(self.cmd)}): {exc.strerror or exc}"
                ) from None
            self.returncode = None
            if not self.detached:
                _running.add(self)
                _register_atexit()
        logger.info("%s pid=%d started (log %s)", self.name, self._proc.pid, self._log_path)

    def _wait_ready(self, ready: Ready, timeout: float) -> None:
        if ready is None:
            return
        check = _ready_check(ready, self)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise EdgesliceError(f"{self.name} exited with code {code} before it was ready")
            if check() and self._proc.poll() is None:
                return
            if time.monotonic() > deadline:
                raise EdgesliceError(
                    f"{self.name} was not ready within {timeout:.0f} s "
                    "(machine overloaded? try a longer timeout)"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def _finish(self, deadline: float) -> int | None:
        """After a SIGTERM: wait for the group until ``deadline``, then SIGKILL it; tidy up."""
        proc, self._proc = self._proc, None
        if proc is None:
            return self.returncode
        _running.discard(self)
        if not _wait_group(proc, deadline):
            logger.warning("%s pid=%d ignored SIGTERM; sending SIGKILL", self.name, proc.pid)
            _killpg(proc.pid, signal.SIGKILL)
            _wait_group(proc, time.monotonic() + 5.0)
        self.returncode = proc.wait()
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)
            self._log_path = None
        return self.returncode


def stop_all(children: Iterable[Supervised], grace: float = 5.0) -> None:
    """Stop several children together: SIGTERM to all, one shared grace period, then SIGKILL."""
    children = list(children)
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        child._finish(deadline)


def stop_groups(pgids: Sequence[int], grace: float = 5.0) -> list[int]:
    """Stop process groups this process did not start (pids from a state file).

    SIGTERM to each, a grace period for every member, then SIGKILL; the groups that
    still have live members afterwards (normally none).
    """
    for pgid in pgids:
        _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_members(g) for g in pgids):
        time.sleep(0.05)
    for pgid in pgids:
        if group_members(pgid):
            logger.warning("process group %d ignored SIGTERM; sending SIGKILL", pgid)
            _killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(group_members(g) for g in pgids):
        time.sleep(0.05)
    return [g for g in pgids if group_members(g)]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``; Linux reads /proc."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    return True


def port_open(host: str, port: int) -> bool:
    """True if a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ready_check(ready: Ready, child: Supervised) -> Callable[[], bool]:
    if isinstance(ready, str):
        return lambda: ready in child.log_tail(1 << 16)
    if isinstance(ready, tuple):
        host, port = ready
        return lambda: port_open(host, port)
    assert ready is not None
    return ready


def _wait_group(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait until the leader is reaped and its group is empty; False at ``deadline``."""
    delay = 0.01
    while True:
        if proc.poll() is not None and not group_members(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def _signals_deferred(main_thread: bool) -> Iterator[set[int | signal.Signals] | None]:
    """Block SIGINT/SIGTERM (main thread only) while a child is forked and recorded."""
    if not main_thread:
        yield None
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent (the child must not load libraries)."""
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def _child_setup(mask: set[int | signal.Signals] | None, parent: int | None) -> Callable[[], None]:
    """The ``preexec_fn``: restore the signal mask; die with ``parent`` when it is given."""
    prctl = _prctl() if parent is not None else None

    def setup() -> None:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if prctl is not None and parent is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent:  # the parent died before prctl: do it ourselves
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


@functools.cache
def _register_atexit() -> None:
    atexit.register(_stop_running)


def _stop_running() -> None:
    stop_all(list(_running), grace=2.0)
