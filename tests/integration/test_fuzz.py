"""Bad input and floods against a real fleet: a real mosquitto, a planner, two agent processes
and a running inference client take 10,000+ malformed messages on every topic they listen to,
then still serve real requests with the whole model's outputs, with bounded memory. A flood
of half-finished transfers from one client does not stop another client, and the flooder
itself is served again once it stops.

Memory is each process's resident set (VmRSS from /proc), printed before and after; only a
generous bound is asserted. Nothing here asserts a duration: recovery times are printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import encode_transfer
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import PlanMessage, RequestEnvelope, RouteHop
from edgeslice.broker.protocol.tensors import pack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient, InferenceResult
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import LocalBroker
from edgeslice.planner.modelspec import load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS read from /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
MODEL = f"{ROOT / 'examples' / 'branchy_model.py'}:build"
AGENTS = ("fz-a1", "fz-a2")
FAST = ("--calibrate-seconds", "0.1")
RSS_GROWTH_LIMIT_MB = 200.0


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Publisher:
    """A raw paho client: QoS 0 in a tight loop (or QoS 1 when the order must be known)."""

    def __init__(self, broker: LocalBroker) -> None:
        self.sent = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fz" + uuid.uuid4().hex)
        self.client.max_queued_messages_set(0)
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(10)

    def send(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self.sent += 1
        if qos or self.sent % 500 == 0:  # let the network thread drain the socket buffer
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- what the fleet must still compute ------------------------------------------------------


def _model() -> tuple[str, tuple[torch.Tensor, ...], list[torch.Tensor]]:
    loaded = load_model(MODEL)
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    return loaded.name, loaded.example_inputs, list(torch.utils._pytree.tree_leaves(out))


def _check(results: list[InferenceResult], expected: list[torch.Tensor]) -> None:
    for res in results:
        for got, want in zip(res.outputs, expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fuzz_fleet(
    broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalFleet]:
    namespace = "fz" + os.urandom(4).hex()
    with LocalFleet(broker.url, namespace, str(tmp_path_factory.mktemp("fuzz"))) as fleet:
        for agent_id in AGENTS:
            fleet.start_agent(AgentSpec(agent_id, "rpi4-4gb", FAST))
        fleet.start_planner(
            MODEL, ["--min-agents", "2", "--replan-delay", "1", "--max-stages", "2"]
        )
        yield fleet


# -- malformed messages ---------------------------------------------------------------------


def _header_chunk(rng: random.Random, **fields: object) -> bytes:
    base: dict[str, object] = {
        "v": [1, 2], "t": uuid.UUID(int=rng.getrandbits(128)).hex, "s": 0, "r": "fuzz",
        "k": "request", "p": "", "pv": 0, "st": 0, "n": 3, "l": 3000, "c": 0, "dl": 0.0,
        "m": {}, "d": b"x" * 10,
    }  # fmt: skip
    return msgpack.packb(base | fields)


class Garbage:
    """Seeded generators of everything a broken or hostile publisher might send."""

    def __init__(self, seed: int, plan: PlanMessage, topics: Topics) -> None:
        self.rng = random.Random(seed)
        self.plan = plan
        self.topics = topics

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, 300))

    def truncated(self) -> bytes:
        chunk = encode_transfer(self.rng.randbytes(500), request_id="r", kind="request").chunks[0]
        return chunk[: self.rng.randint(1, len(chunk) - 1)]

    def wrong_shape(self) -> bytes:
        shapes: list[object] = [
            [1, 2, 3], 42, "chunk", None, True, 1.5, {"t": 5, "s": "x", "d": "text"},
            {"t": "x", "s": 0, "d": b"", "v": "1.0"}, {"kind": "status", "v": [1, 0]},
            {"agent_id": 7, "state": ["online"]}, {"v": [1, 0], "kind": "plan", "stages": "all"},
            {"t": "x" * 300, "s": 1, "d": b"y"}, [{"t": "x"}] * 5,
        ]  # fmt: skip
        return msgpack.packb(self.rng.choice(shapes))

    def out_of_range_seq(self) -> bytes:
        seq = self.rng.choice([2**32, 2**40, -1, 10**6])
        return msgpack.packb({"t": uuid.uuid4().hex, "s": seq, "d": b"data"})

    def lying_length(self) -> bytes:
        choice = self.rng.randrange(3)
        if choice == 0:  # header: 1 chunk of 10 B, carries 100
            return _header_chunk(self.rng, n=1, l=10, d=b"z" * 100)
        if choice == 1:  # more chunks than bytes
            return _header_chunk(self.rng, n=500, l=10)
        return _header_chunk(self.rng, n=1, l=20, c=12345, d=b"q" * 20)  # checksum lies

    def huge_size(self) -> bytes:
        length = self.rng.choice([2**40, 10**9, 2**31, 900 * 2**20])
        return _header_chunk(self.rng, n=self.rng.choice([2, 2**31]), l=length)

    def half_finished(self, kind: str = "request") -> bytes:
        return _header_chunk(self.rng, k=kind, r=uuid.uuid4().hex)

    def bad_tensors(self, sender: str, stale: bool = False) -> tuple[str, bytes]:
        """A whole, well-formed transfer whose tensors do not fit the stage: unknown dtype,
        wrong shape, or (``stale``) an old plan version; the agent must answer, not crash."""
        index = self.rng.randrange(len(self.plan.stages))
        stage = self.plan.stages[index]
        agent = self.rng.choice(stage.agents)
        route = [RouteHop(s.agents[0], s.artifact) for s in self.plan.stages]
        route[index] = RouteHop(agent, stage.artifact)
        if self.rng.random() < 0.5:
            meta, payload = pack_tensors([torch.zeros(4)])
            meta = [dict(meta[0], dtype=self.rng.choice(["float99", "complex512", ""]))]
        else:
            meta, payload = pack_tensors([torch.zeros(1, self.rng.randint(1, 9))])
        env = RequestEnvelope(route=route, reply_to=sender, tensors=meta, model=self.plan.model)
        version = 0 if stale else self.plan.plan_version
        encoded = encode_transfer(
            bytes(payload), request_id=uuid.uuid4().hex, kind="activation" if index else "request",
            plan_id=self.plan.plan_id, plan_version=version, stage=index,
            meta=codec.to_wire(env),
        )  # fmt: skip
        return self.topics.inbox(agent, sender), encoded.chunks[0]

    def any_payload(self) -> bytes:
        return self.rng.choice(
            [
                self.random_bytes, self.truncated, self.wrong_shape, self.out_of_range_seq,
                self.lying_length, self.huge_size, self.half_finished,
            ]
        )()  # fmt: skip


def _fuzz(pub: Publisher, garbage: Garbage, client_id: str, total: int) -> dict[str, int]:
    """Publish ``total`` malformed messages spread over every listened-to topic."""
    t, plan, rng = garbage.topics, garbage.plan, garbage.rng
    senders = ["fuzz-1", "fuzz-2", "fuzz-3", "ghost"]
    per_agent: list[Callable[[str], str]] = [
        lambda a: t.inbox(a, rng.choice(senders)),
        lambda a: t.assignment_desired(a),
        lambda a: t.cmd(a, rng.choice(["ping", "calibrate", "bogus", "drain"])),
        lambda a: t.probe(a),
        lambda a: t.status(a),
        lambda a: t.info(a),
        lambda a: t.telemetry(a),
        lambda a: t.assignment_reported(a),
    ]
    shas = [s.artifact for s in plan.stages] + ["0" * 64]
    shared: list[Callable[[], str]] = [
        lambda: t.artifact_get(rng.choice(shas)),
        lambda: t.artifact_data(rng.choice(shas)),
        lambda: t.plan(plan.model),
        lambda: t.client_results(client_id),
        lambda: t.planner_status(),
        lambda: t.status(rng.choice(["ghost-1", "ghost-2"])),
    ]
    counts: dict[str, int] = {}

    def send(kind: str, topic: str, payload: bytes, retain: bool = False) -> None:
        pub.send(topic, payload, retain=retain)
        counts[kind] = counts.get(kind, 0) + 1

    agents = sorted({a for s in plan.stages for a in s.agents})
    while sum(counts.values()) < total:
        roll = rng.random()
        if roll < 0.45:
            send("agent topics", rng.choice(per_agent)(rng.choice(agents)), garbage.any_payload())
        elif roll < 0.65:
            send("shared topics", rng.choice(shared)(), garbage.any_payload())
        elif roll < 0.80:  # one sender floods every agent with half-finished requests
            agent = rng.choice(agents)
            send("flood (half-finished)", t.inbox(agent, "fuzz-flood"), garbage.half_finished())
        elif roll < 0.90:  # half-finished results on the running client's topic
            send("results flood", t.client_results(client_id), garbage.half_finished("result"))
        else:
            topic, chunk = garbage.bad_tensors(rng.choice(senders), stale=rng.random() < 0.3)
            send("bad tensors / stale plan", topic, chunk)
    for agent in agents:  # retained garbage: the planner re-publishes its own over it
        send("retained garbage", t.assignment_desired(agent), garbage.wrong_shape(), retain=True)
    send("retained garbage", t.plan(plan.model), b"\xc1 retained garbage", retain=True)
    pub.client.publish(t.planner_status(), b"sync", qos=1).wait_for_publish(10)
    return counts


# -- the tests ------------------------------------------------------------------------------


def _pids(fleet: LocalFleet) -> dict[str, int]:
    pids = {name: fleet.procs[name].pid for name in (*AGENTS, "planner")}
    out = {name: pid for name, pid in pids.items() if pid is not None}
    out["client (test process)"] = os.getpid()
    return out


def test_a_flooding_client_does_not_stop_another_and_recovers(
    fuzz_fleet: LocalFleet, broker: LocalBroker
) -> None:
    name, inputs, expected = _model()
    settings = parse_broker_url(fuzz_fleet.broker_url, fuzz_fleet.namespace)
    topics = Topics(fuzz_fleet.namespace)

    async def scenario() -> None:
        async with (
            InferenceClient(settings, name, client_id="victim") as victim,
            InferenceClient(settings, name, client_id="flooder") as flooder,
        ):
            plan = await victim.wait_ready(180)
            await flooder.wait_ready(60)
            _check([await victim.infer(inputs, timeout=120)], expected)
            agents = sorted({a for s in plan.stages for a in s.agents})
            garbage = Garbage(1, plan, topics)

            def flood() -> None:  # what the fault trial saw, acknowledged by the broker
                pub = Publisher(broker)
                try:
                    for agent in agents:
                        for _ in range(300):
                            pub.send(topics.inbox(agent, "flooder"), garbage.half_finished(), 1)
                    for _ in range(600):
                        results = topics.client_results("victim")
                        pub.send(results, garbage.half_finished("result"), 1)
                finally:
                    pub.close()

            await asyncio.to_thread(flood)
            stopped = time.monotonic()
            during = await victim.infer(inputs, timeout=60)  # others are not blocked
            _check([during], expected)
            print(f"\nvictim served {time.monotonic() - stopped:.2f}s after the flood")
            for _ in range(10):  # the flooder: refused while its own transfers are fresh
                try:
                    own = await flooder.infer(inputs, timeout=30)
                    break
                except EdgesliceError as exc:
                    print(f"flooder refused: {exc}")
            else:
                raise AssertionError("the flooder was never served again")
            _check([own], expected)
            print(
                f"flooder served again {time.monotonic() - stopped:.2f}s after its flood "
                f"(attempts {own.attempts})"
            )

    asyncio.run(scenario())
    assert all(fuzz_fleet.alive(n) for n in (*AGENTS, "planner"))


def test_ten_thousand_malformed_messages_leave_every_component_serving(
    fuzz_fleet: LocalFleet, broker: LocalBroker
) -> None:
    name, inputs, expected = _model()
    settings = parse_broker_url(fuzz_fleet.broker_url, fuzz_fleet.namespace)
    topics = Topics(fuzz_fleet.namespace)

    async def scenario() -> None:
        async with InferenceClient(settings, name, client_id="fuzzed") as client:
            plan = await client.wait_ready(180)
            _check([await client.infer(inputs, timeout=120)], expected)
            before = {n: rss_mb(p) for n, p in _pids(fuzz_fleet).items()}
            pub = Publisher(broker)
            started = time.monotonic()
            try:
                garbage = Garbage(7, plan, topics)
                counts = await asyncio.to_thread(_fuzz, pub, garbage, "fuzzed", 10_500)
            finally:
                pub.close()
            print(f"\nsent {sum(counts.values())} malformed messages in "
                  f"{time.monotonic() - started:.1f}s: {counts}")  # fmt: skip
            results = list(
                await asyncio.gather(*(client.infer(inputs, timeout=120) for _ in range(4)))
            )
            _check(results, expected)
            assert client.plan is not None and client.plan.plan_id == plan.plan_id
            after = {n: rss_mb(p) for n, p in _pids(fuzz_fleet).items()}
            for n in before:
                print(f"RSS {n}: before {before[n]:.1f} MiB, after {after[n]:.1f} MiB "
                      f"(+{after[n] - before[n]:.1f})")  # fmt: skip
            for n in before:
                assert after[n] - before[n] < RSS_GROWTH_LIMIT_MB, n

        # the planner put its own plan back over the retained garbage: a client that
        # connects now finds it ready
        async with InferenceClient(settings, name, client_id="late") as late:
            again = await late.wait_ready(30)
            assert again.plan_id == plan.plan_id and again.stages

    asyncio.run(scenario())
    assert all(fuzz_fleet.alive(n) for n in (*AGENTS, "planner"))
