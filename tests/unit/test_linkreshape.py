"""A running link proxy changes shape: in process (LinkProxy.reshape, open connections
included) and as a process (shape file + SIGHUP), and a bad shape file changes nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.lab.linkem import LinkProxy
from edgeslice.lab.linkproc import LinkProxyProcess
from edgeslice.lab.linkshape import LinkSpec, Pacer, read_shape_file, write_shape_file


def test_shape_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "link.json"
    spec = LinkSpec.from_mbit(4, 10, 0.5)
    write_shape_file(path, spec)
    assert read_shape_file(path) == spec
    write_shape_file(path, LinkSpec())
    assert read_shape_file(path).unlimited
    path.write_text('{"latency_ms": 3}')
    with pytest.raises(ConfigError, match=r"link\.json.*bandwidth_mbit"):
        read_shape_file(path)
    with pytest.raises(ConfigError, match=r"missing\.json"):
        read_shape_file(tmp_path / "missing.json")


def test_pacer_set_rate_applies_from_now_on() -> None:
    pacer = Pacer(1000.0)
    assert pacer.schedule(0.0, 1000) == pytest.approx(1.0)
    pacer.set_rate(100.0)
    assert pacer.schedule(1.0, 100) == pytest.approx(2.0)  # booked bytes keep their time


async def _timed_send(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, n: int) -> float:
    start = time.perf_counter()
    writer.write(b"x" * n)
    await writer.drain()
    await reader.readexactly(n)
    return time.perf_counter() - start


def test_reshape_slows_an_open_connection() -> None:
    """The same connection before and after: 40 Mbit/s, then 4 Mbit/s (both directions)."""

    async def scenario() -> tuple[float, float]:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = await LinkProxy().start(
            "127.0.0.1", 0, "127.0.0.1", port, LinkSpec.from_mbit(40, 0)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            fast = await _timed_send(writer, reader, 500_000)  # 0.1 s each way at 40 Mbit/s
            proxy.reshape(LinkSpec.from_mbit(4, 0))
            slow = await _timed_send(writer, reader, 500_000)  # 1.0 s each way at 4 Mbit/s
        finally:
            writer.close()
            await proxy.stop()
            server.close()
        return fast, slow

    fast, slow = asyncio.run(scenario())
    print(f"\n500 kB echoed through one connection: {fast:.2f}s at 40 Mbit/s, {slow:.2f}s at 4")
    assert slow > 4 * fast
    assert 0.9 < slow < 4.0  # ~1 s: pacing is per direction, the echo overlaps the two


def test_process_reshapes_on_sighup_and_keeps_its_shape_on_a_bad_file(tmp_path: Path) -> None:
    shape = tmp_path / "link.json"
    spec = LinkSpec.from_mbit(100, 1)
    with LinkProxyProcess("127.0.0.1", 9, spec, shape_file=str(shape)) as proc:
        proc.reshape(LinkSpec.from_mbit(4, 20))
        deadline = time.monotonic() + 10
        while "reshaped to 4 Mbit/s, 20 ms one-way" not in proc.log_tail():
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        shape.write_text("not json")
        proc.signal(1)  # SIGHUP with a broken file
        while "shape unchanged (4 Mbit/s, 20 ms one-way" not in proc.log_tail():
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
    assert proc.returncode == 0
