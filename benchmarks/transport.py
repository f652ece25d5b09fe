"""Transport benchmark: chunked tensor transfers vs raw paho publishes of the same chunk size.

For each tensor size (1, 16, 64 MiB), ``runs`` times (5 by default), against the same broker:

* **chunked** (ours): ``pack_tensors`` -> ``stream_transfer`` (256 KiB chunks) -> QoS 1
  publishes via :class:`broker.client.MqttClient` -> a second MqttClient -> ``Reassembler`` ->
  ``unpack_tensors``; timed from ``pack_tensors`` to the tensor in the receiver's hand.
* **raw** (baseline): as many random bytes cut into the same chunk size, QoS 1, published by
  a plain paho client and counted by a plain paho subscriber; timed from the first cut to the
  last byte counted. Both raw clients get TCP_NODELAY, as MqttClient sets it: without it
  Nagle's algorithm holds back the subscriber's PUBACKs behind delayed ACKs, which made the
  baseline slow and erratic (16 MiB took 60 to 170 ms) and flattered the ratio.
* **unchunked**: one 64 MiB QoS 1 message through plain paho, for contrast.

One *run* of one size measures both paths interleaved (a chunked transfer, a raw one, and so
on; which goes first alternates between runs), each path with its own fresh receiver process:
``WARMUP`` warm-up transfers, then ``timed`` ones (more for small sizes, which take
milliseconds; the same count for both paths). Interleaving puts both paths under the same
outside conditions: measured in blocks, one path's block could catch a burst of other work on
the machine and the other's not, which made run ratios swing from 0.5 to 3. A run's ratio
is raw median time / chunked median time (chunked throughput as a fraction of raw); per size
the benchmark reports the median ratio over runs, its min-max and how many runs met the target
(>= 0.9), and the JSON keeps every run's samples and the load average when it started (other
work on the machine distorts timings: read the figures beside it). Both paths get the same
warm-up, QoS, chunk size and process layout, so the ratio is what the chunked protocol costs.
Several warm-up transfers, not one:
a fresh process needs a few transfers before its allocator and lazy imports settle (at 1 MiB the
chunked path's 2nd..4th transfers took 2.5x, 1.6x, 1.3x its steady time), and the agents this
stands for are long-lived processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.benchmarks.common import load_average, median, write_result
from edgeslice.broker.client import MqttClient
from edgeslice.broker.protocol.chunking import Completed, Reassembler, stream_transfer
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.settings import parse_broker_url
from edgeslice.lab.server import LocalBroker

MiB = 1024 * 1024
CHUNK = 256 * 1024
WARMUP = 3  # transfers discarded at the start of every measure() call, for both paths
TARGET = 0.9  # chunked throughput >= TARGET x raw
RUNS = 5


async def _chunked_receiver(url: str, topic: str, runs: int, ready: Any, done: Any) -> None:
    settings = parse_broker_url(url)
    receiver = MqttClient(settings, "bench-rx-" + uuid.uuid4().hex[:8])
    await receiver.connect()
    await receiver.subscribe(topic, qos=1)
    await asyncio.sleep(0.2)
    ready.put(True)
    reassembler = Reassembler()
    left = runs
    async with asyncio.timeout(120.0 * runs):  # consume like an agent does: messages()
        async for msg in receiver.messages():
            result = reassembler.feed(msg.payload, time.time())
            if isinstance(result, Completed):
                out = unpack_tensors(result.header.meta["tensors"], result.payload, share=True)
                done.put((time.perf_counter(), int(out[0].numel())))
                left -= 1
                if not left:
                    break
    await receiver.close()


def _nodelay(client: paho.Client) -> None:
    """TCP_NODELAY on a plain paho client's socket, as MqttClient sets it on every connect."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _raw_receiver(url: str, topic: str, runs: int, size: int, ready: Any, done: Any) -> None:
    settings = parse_broker_url(url)
    got = 0
    finished = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        nonlocal got
        got += len(msg.payload)
        if got >= size:
            done.put((time.perf_counter(), got))
            got = 0
            finished.set()

    subscribed = threading.Event()
    rx = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-rx-" + uuid.uuid4().hex[:8])
    rx.on_message = on_message
    rx.on_subscribe = lambda *_: subscribed.set()
    rx.connect(settings.host, settings.port)
    _nodelay(rx)
    rx.loop_start()
    rx.subscribe(topic, qos=1)
    subscribed.wait(10)
    ready.put(True)
    for _ in range(runs):
        finished.wait(180)
        finished.clear()
    rx.loop_stop()
    rx.disconnect()


def _receiver_main(
    kind: str, url: str, topic: str, runs: int, size: int, ready: Any, done: Any
) -> None:
    if kind == "chunked":
        asyncio.run(_chunked_receiver(url, topic, runs, ready, done))
    else:
        _raw_receiver(url, topic, runs, size, ready, done)


async def _chunked_once(sender: MqttClient, topic: str, size: int, done: Any) -> float:
    """One chunked transfer: pack -> chunks -> QoS 1 publishes; seconds until unpacked."""
    import torch

    tensor = torch.randn(size // 4)
    start = time.perf_counter()
    meta, payload = pack_tensors([tensor])
    _header, chunks = stream_transfer(
        payload, request_id="bench", kind="activation", meta={"tensors": meta}, chunk_size=CHUNK
    )
    acks = [sender.publish_nowait(topic, c, qos=1) for c in chunks]
    finished, count = await asyncio.to_thread(done.get, True, 180)
    if count != tensor.numel():
        raise RuntimeError("receiver got a different tensor")
    await asyncio.gather(*acks)
    return float(finished - start)


def _raw_client(url: str) -> paho.Client:
    settings = parse_broker_url(url)
    tx = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-tx-" + uuid.uuid4().hex[:8])
    tx.max_inflight_messages_set(64)
    tx.connect(settings.host, settings.port)
    _nodelay(tx)
    tx.loop_start()
    return tx


def _raw_once(tx: paho.Client, topic: str, size: int, chunk: int, done: Any) -> float:
    """One raw transfer: the same bytes cut into ``chunk``-sized QoS 1 publishes."""
    view = memoryview(os.urandom(size))
    start = time.perf_counter()
    infos = [tx.publish(topic, view[i : i + chunk].tobytes(), qos=1) for i in range(0, size, chunk)]
    finished, _count = done.get(True, 180)
    for info in infos:
        info.wait_for_publish(30)
    return float(finished - start)


class _Receiver:
    """A receiver in its own (fresh, spawned) process, like an agent, on its own topic."""

    def __init__(self, kind: str, url: str, size: int, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.done = ctx.Queue(), ctx.Queue()
        self.topic = f"edgeslice-bench/{uuid.uuid4().hex[:8]}"
        args = (kind, url, self.topic, count, size, self.ready, self.done)
        self.proc = ctx.Process(target=_receiver_main, args=args)
        self.proc.start()

    def wait_ready(self) -> None:
        self.ready.get(True, 60)

    def close(self) -> None:
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


async def _interleave(
    kinds: tuple[str, ...], url: str, size: int, count: int, chunk: int, rx: dict[str, _Receiver]
) -> dict[str, list[float]]:
    sender = MqttClient(parse_broker_url(url), "bench-tx-" + uuid.uuid4().hex[:8])
    await sender.connect()
    tx = _raw_client(url)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for _ in range(count):
            for kind in kinds:
                r = rx[kind]
                if kind == "chunked":
                    seconds = await _chunked_once(sender, r.topic, size, r.done)
                else:
                    seconds = await asyncio.to_thread(_raw_once, tx, r.topic, size, chunk, r.done)
                times[kind].append(seconds)
    finally:
        await sender.close()
        tx.loop_stop()
        tx.disconnect()
    return times


def measure_paths(
    kinds: tuple[str, ...], url: str, size: int, count: int, chunk: int = CHUNK
) -> dict[str, list[float]]:
    """Seconds per transfer of ``size`` bytes for each path in ``kinds``, ``count`` each,
    interleaved (one of each in turn, in ``kinds`` order) so that whatever else the machine
    is doing meanwhile hits both paths alike; each path has its own receiver process."""
    receivers = {kind: _Receiver(kind, url, size, count) for kind in kinds}
    try:
        for receiver in receivers.values():
            receiver.wait_ready()
        return asyncio.run(_interleave(kinds, url, size, count, chunk, receivers))
    finally:
        for receiver in receivers.values():
            receiver.close()


def measure(kind: str, url: str, size: int, runs: int, chunk: int = CHUNK) -> list[float]:
    """Seconds per transfer of ``size`` bytes on one path alone."""
    return measure_paths((kind,), url, size, runs, chunk)[kind]


def _timed(mib: int, quick: bool) -> int:
    """Timed transfers per path and run: more for small sizes, which take milliseconds."""
    return 2 if quick else max(4, 32 // mib)


def run_size(url: str, mib: int, timed: int, index: int) -> dict[str, Any]:
    """One run of one size: both paths interleaved (which goes first alternates with ``index``)."""
    size = mib * MiB
    load = load_average()
    kinds = ("chunked", "raw") if index % 2 == 0 else ("raw", "chunked")
    measured = measure_paths(kinds, url, size, WARMUP + timed)
    samples = {kind: times[WARMUP:] for kind, times in measured.items()}
    chunked_s, raw_s = median(samples["chunked"]), median(samples["raw"])
    return {
        "run": index + 1,
        "first": "chunked" if index % 2 == 0 else "raw",
        "load_avg_1m": load[0],
        "chunked_s": chunked_s,
        "raw_s": raw_s,
        "ratio": raw_s / chunked_s,
        "chunked_samples_s": samples["chunked"],
        "raw_samples_s": samples["raw"],
    }


def summarise(mib: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size: medians over runs (``chunked_s``/``raw_s``: the cost model fits these),
    the median ratio, its min-max and how many runs met ``TARGET``."""
    size = mib * MiB
    ratios = [r["ratio"] for r in runs]
    chunked_s, raw_s = median([r["chunked_s"] for r in runs]), median([r["raw_s"] for r in runs])
    return {
        "size_mib": mib,
        "chunk_bytes": CHUNK,
        "samples": sum(len(r["chunked_samples_s"]) for r in runs),
        "chunked_s": chunked_s,
        "raw_s": raw_s,
        "chunked_MBps": size / chunked_s / 1e6,
        "raw_MBps": size / raw_s / 1e6,
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "runs_meeting_target": sum(ratio >= TARGET for ratio in ratios),
        "runs": runs,
    }


def main(
    quick: bool = False, broker_url: str | None = None, runs: int | None = None
) -> dict[str, Any]:
    """Run the benchmark, print a table, write results/transport.json; returns the result."""
    import torch

    torch.manual_seed(0)
    sizes = [1, 16] if quick else [1, 16, 64]
    runs = runs or (1 if quick else RUNS)
    local = None if broker_url else LocalBroker(port=0).start()
    url = broker_url or (local.url if local else "")
    rows = []
    load_start = load_average()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    try:
        for mib in sizes:
            done = []
            for index in range(runs):
                done.append(run_size(url, mib, _timed(mib, quick), index))
                print(
                    f"{mib:>4} MiB  run {index + 1}/{runs}: ratio {done[-1]['ratio']:.2f} "
                    f"(chunked {done[-1]['chunked_s'] * 1e3:.1f} ms, raw "
                    f"{done[-1]['raw_s'] * 1e3:.1f} ms, load {done[-1]['load_avg_1m']:.2f})",
                    flush=True,
                )
            row = summarise(mib, done)
            rows.append(row)
            print(
                f"{mib:>4} MiB  chunked {row['chunked_MBps']:7.1f} MB/s   raw paho "
                f"{row['raw_MBps']:7.1f} MB/s   ratio {row['ratio']:.2f} "
                f"(min {row['ratio_min']:.2f}, max {row['ratio_max']:.2f}; "
                f"{row['runs_meeting_target']}/{runs} runs >= {TARGET})",
                flush=True,
            )
        big = max(sizes) * MiB
        unchunked = median(measure("raw", url, big, WARMUP + 2)[WARMUP:])
        print(
            f"{max(sizes):>4} MiB  one unchunked message: {big / unchunked / 1e6:7.1f} MB/s",
            flush=True,
        )
    finally:
        if local is not None:
            local.stop()
    need = runs - runs // 5  # 4 of 5
    result = {
        "quick": quick,
        "broker": local.kind if local else url,
        "runs": runs,
        "warmup": WARMUP,
        "target": f"chunked >= {TARGET} x raw at 256 KiB chunks in >= {need} of {runs} runs",
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_average()),
        "rows": rows,
        "unchunked": {"size_mib": max(sizes), "seconds": unchunked, "MBps": big / unchunked / 1e6},
        "min_ratio": min(r["ratio"] for r in rows),
        "target_met": all(r["runs_meeting_target"] >= need for r in rows),
    }
    path = write_result("transport-quick" if quick else "transport", result)
    print(
        f"median ratio chunked/raw >= {result['min_ratio']:.2f} at every size; target "
        f"(>= {TARGET} in >= {need}/{runs} runs per size) "
        f"{'met' if result['target_met'] else 'MISSED'}; load average "
        f"{result['load_avg_start'][0]:.2f} -> {result['load_avg_end'][0]:.2f}; wrote {path}"
    )
    return result


if __name__ == "__main__":
    main()
