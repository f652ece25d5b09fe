"""Broker benchmark: chunked transport MB/s on every broker kind, beside mosquitto's.

The transport benchmark's own measurement (:func:`benchmarks.transport.measure`: a sender
in this process, the receiver in its own process, QoS 1, 256 KiB chunks, ``WARMUP``
transfers discarded) run against each broker :class:`lab.server.LocalBroker` can start
(mosquitto, amqtt, RabbitMQ's MQTT plugin, NATS' MQTT support), each on free loopback
ports with its development config (lab/brokers.py). Per broker and ``runs`` times (3 by
default): the chunked path (ours) and raw paho publishes of the same chunks; a run's
figure is the median of its timed transfers, and the result is the median over runs with
its min-max, beside the load average (2 shared cores: read the figures with it). Brokers
that are not installed are listed as skipped.
"""

from __future__ import annotations

from typing import Any

from edgeslice.benchmarks.common import load_average, median, write_result
from edgeslice.benchmarks.transport import CHUNK, WARMUP, MiB, measure
from edgeslice.broker.protocol.errors import BrokerError
from edgeslice.lab.server import KINDS, LocalBroker

RUNS = 3
SIZE_MIB = 16


def run_kind(kind: str, mib: int, runs: int, timed: int) -> dict[str, Any]:
    """``runs`` runs of both paths against a fresh broker of ``kind``; MB/s per run."""
    size = mib * MiB
    with LocalBroker(kind=kind) as server:  # type: ignore[arg-type]
        done = []
        for index in range(runs):
            load = load_average()[0]
            row: dict[str, Any] = {"run": index + 1, "load_avg_1m": load}
            for path in ("chunked", "raw") if index % 2 == 0 else ("raw", "chunked"):
                seconds = median(measure(path, server.url, size, WARMUP + timed)[WARMUP:])
                row[f"{path}_s"] = seconds
                row[f"{path}_MBps"] = size / seconds / 1e6
            done.append(row)
            print(
                f"{kind:>9} {mib} MiB run {index + 1}/{runs}: chunked "
                f"{row['chunked_MBps']:6.1f} MB/s, raw {row['raw_MBps']:6.1f} MB/s "
                f"(load {load:.2f})",
                flush=True,
            )
    summary: dict[str, Any] = {"kind": kind, "size_mib": mib, "chunk_bytes": CHUNK}
    for path in ("chunked", "raw"):
        rates = [r[f"{path}_MBps"] for r in done]
        summary.update(
            {
                f"{path}_MBps": median(rates),
                f"{path}_MBps_min": min(rates),
                f"{path}_MBps_max": max(rates),
            }
        )
    summary["runs"] = done
    return summary


def main(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Run every installed broker kind; print a table; write results/brokers.json."""
    import torch

    torch.manual_seed(0)
    runs = runs or (1 if quick else RUNS)
    mib = 1 if quick else SIZE_MIB
    timed = 2 if quick else 4
    load_start = load_average()
    rows, skipped = [], {}
    for kind in KINDS:
        try:
            rows.append(run_kind(kind, mib, runs, timed))
        except BrokerError as exc:
            skipped[kind] = str(exc).splitlines()[0]
            print(f"{kind:>9} skipped: {skipped[kind]}", flush=True)
    base = next((r["chunked_MBps"] for r in rows if r["kind"] == "mosquitto"), None)
    for row in rows:
        row["vs_mosquitto"] = row["chunked_MBps"] / base if base else None
        print(
            f"{row['kind']:>9}: chunked {row['chunked_MBps']:6.1f} MB/s "
            f"(min {row['chunked_MBps_min']:.1f}, max {row['chunked_MBps_max']:.1f}), raw paho "
            f"{row['raw_MBps']:6.1f} MB/s"
            + (f", {row['vs_mosquitto']:.2f} x mosquitto" if base else ""),
            flush=True,
        )
    load_end = load_average()
    result: dict[str, Any] = {
        "quick": quick,
        "runs": runs,
        "warmup": WARMUP,
        "timed_per_run": timed,
        "size_mib": mib,
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_end),
        "rows": rows,
        "skipped": skipped,
    }
    path = write_result("brokers-quick" if quick else "brokers", result)
    print(
        f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}; wrote {path}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
