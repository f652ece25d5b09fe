"""lab.supervisor on real processes: readiness, early exit, grace then SIGKILL, whole groups."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.lab.server import free_port
from edgeslice.lab.supervisor import (
    Supervised,
    group_members,
    pid_alive,
    port_open,
    stop_all,
    stop_groups,
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


SLEEPER = _python("""
    import time
    print("ready to serve", flush=True)
    time.sleep(60)
""")

STUBBORN = _python("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready, ignoring SIGTERM", flush=True)
    time.sleep(60)
""")

# a leader that forks a grandchild (same group) and prints its pid
FORKER = _python("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("grandchild", child.pid, flush=True)
    time.sleep(60)
""")


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_start_waits_for_the_ready_line_and_stop_ends_it(tmp_path: Path) -> None:
    log = tmp_path / "sleeper.log"
    child = Supervised("sleeper", SLEEPER, log).start(ready="ready to serve", timeout=20)
    pid = child.pid
    assert pid is not None and child.is_running()
    assert "ready to serve" in child.log_tail()
    assert child.stop(grace=5) == -signal.SIGTERM
    assert child.stop() == -signal.SIGTERM  # safe to call twice
    assert child.pid is None and not child.is_running() and not pid_alive(pid)
    assert log.exists()  # a log the caller named is kept


def test_a_child_that_exits_early_is_reported_with_its_log_tail() -> None:
    crasher = _python("""
        import sys
        print("cannot open the widget: permission denied", flush=True)
        sys.exit(3)
    """)
    child = Supervised("crasher", crasher)
    with pytest.raises(EdgesliceError) as info:
        child.start(ready="never printed", timeout=20)
    text = str(info.value)
    assert "crasher exited with code 3 before it was ready" in text
    assert "cannot open the widget: permission denied" in text
    assert not child.is_running() and child.returncode == 3


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    child = Supervised("stubborn", STUBBORN).start(ready="ignoring SIGTERM", timeout=20)
    pid = child.pid
    assert pid is not None
    started = time.monotonic()
    assert child.stop(grace=0.5) == -signal.SIGKILL
    print(f"stubborn child stopped {time.monotonic() - started:.2f} s after SIGTERM")
    assert not pid_alive(pid)


def test_stopping_a_child_stops_what_it_forked() -> None:
    child = Supervised("forker", FORKER).start(ready="grandchild", timeout=20)
    pid = child.pid
    assert pid is not None
    line = next(ln for ln in child.log_tail().splitlines() if ln.startswith("grandchild"))
    grandchild = int(line.split()[1])
    assert pid in group_members(pid) and grandchild in group_members(pid)
    child.stop(grace=5)
    assert _gone(grandchild) and not group_members(pid)


def test_port_readiness_and_stop_all() -> None:
    server = _python("""
        import socket, sys, time
        sock = socket.socket()
        sock.bind(("127.0.0.1", int(sys.argv[1])))
        time.sleep(0.3)  # bound but not listening yet: readiness must wait for listen()
        sock.listen()
        time.sleep(60)
    """)
    port = free_port()
    child = Supervised("server", [*server, str(port)]).start(ready=("127.0.0.1", port), timeout=20)
    assert port_open("127.0.0.1", port)
    other = Supervised("sleeper", SLEEPER).start(ready="ready to serve", timeout=20)
    stop_all([child, other], grace=5)
    assert not child.is_running() and not other.is_running()
    assert child.returncode == other.returncode == -signal.SIGTERM


def test_stop_groups_stops_children_recorded_by_another_process() -> None:
    # started elsewhere (think: `testbed up`), known here only by pid
    proc = subprocess.Popen(STUBBORN, start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    assert stop_groups([proc.pid], grace=0.3) == []
    assert proc.wait(10) == -signal.SIGKILL


def test_a_child_dies_when_its_parent_is_killed() -> None:
    parent = _python(f"""
        import os
        from edgeslice.lab.supervisor import Supervised
        child = Supervised("orphan", {SLEEPER!r}).start(ready="ready to serve", timeout=20)
        print(child.pid, flush=True)
        os.kill(os.getpid(), 9)
    """)
    done = subprocess.run(parent, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _gone(int(done.stdout.split()[0]))
