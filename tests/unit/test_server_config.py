"""Generated broker configs: the dev configs of broker.server and the production set-up.

The ACL is checked by *evaluating* the rendered file the way mosquitto does
(user rules, then ``pattern`` rules with ``%u`` substituted) against topics
built by the topic table, so a rule that does not match what edgeslice
publishes fails here, not on a device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from paho.mqtt.client import topic_matches_sub

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.topics import Topics
from edgeslice.lab.amqtt_runner import amqtt_dev_config
from edgeslice.lab.broker_cli import broker_group
from edgeslice.lab.mosquitto_conf import MosquittoSetup, render_acl, render_all, split_names
from edgeslice.lab.server import mosquitto_dev_config

SHA = "ab" * 32


def evaluate(acl_text: str, username: str, topic: str, access: str) -> bool:
    """Would mosquitto 2.0's acl_file check allow ``access`` ("read"/"write") on ``topic``?"""
    user_rules: dict[str | None, list[tuple[str, str]]] = {}
    patterns: list[tuple[str, str]] = []
    current: str | None = None
    for line in acl_text.splitlines():
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            current = rest.strip()
            continue
        kind, _, filt = rest.partition(" ")
        assert kind in ("read", "write", "readwrite"), line
        (patterns if keyword == "pattern" else user_rules.setdefault(current, [])).append(
            (kind, filt)
        )
    rules = user_rules.get(username, []) + [(k, f.replace("%u", username)) for k, f in patterns]
    return any(access in kind and topic_matches_sub(filt, topic) for kind, filt in rules)


@pytest.fixture
def setup() -> MosquittoSetup:
    return MosquittoSetup(agents=("pi-1", "pi-2"), clients=("app",))


def test_agent_publishes_only_its_own_topics_and_the_data_path(setup: MosquittoSetup) -> None:
    t, acl = Topics(), render_acl(setup)
    for topic in (
        t.status("pi-1"),
        t.info("pi-1"),
        t.telemetry("pi-1"),
        t.assignment_reported("pi-1"),
        t.cmd_result("pi-1", "calibrate"),
        t.inbox("pi-2", "app"),
        t.client_results("app"),
        t.artifact_get(SHA),
    ):
        assert evaluate(acl, "pi-1", topic, "write"), topic
    for topic in (
        t.status("pi-2"),
        t.info("pi-2"),
        t.assignment_reported("pi-2"),
        t.cmd_result("pi-2", "calibrate"),
        t.assignment_desired("pi-1"),
        t.cmd("pi-2", "drain"),
        t.artifact_data(SHA),
        t.plan("mobilenet"),
        t.planner_status(),
    ):
        assert not evaluate(acl, "pi-1", topic, "write"), topic


def test_agent_reads_its_own_orders_and_shared_state_only(setup: MosquittoSetup) -> None:
    t, acl = Topics(), render_acl(setup)
    for topic in (
        t.assignment_desired("pi-1"),
        t.cmd("pi-1", "calibrate"),
        t.inbox("pi-1", "app"),
        t.artifact_data(SHA),
        t.plan("mobilenet"),
        t.planner_status(),
    ):
        assert evaluate(acl, "pi-1", topic, "read"), topic
    for topic in (
        t.assignment_desired("pi-2"),
        t.cmd("pi-2", "calibrate"),
        t.inbox("pi-2", "app"),
        t.telemetry("pi-2"),
        t.client_results("app"),
    ):
        assert not evaluate(acl, "pi-1", topic, "read"), topic


def test_planner_monitor_and_client_roles(setup: MosquittoSetup) -> None:
    t, acl = Topics(), render_acl(setup)
    every = [
        t.status("pi-1"),
        t.inbox("pi-2", "app"),
        t.plan("m"),
        t.client_results("app"),
        t.cmd("pi-1", "x"),
    ]
    for topic in every:
        assert evaluate(acl, "planner", topic, "read")
        assert evaluate(acl, "planner", topic, "write")
        assert evaluate(acl, "monitor", topic, "read")
        assert not evaluate(acl, "monitor", topic, "write")
    assert not evaluate(acl, "monitor", t.status("monitor"), "write")
    assert evaluate(acl, "app", t.inbox("pi-1", "app"), "write")
    assert evaluate(acl, "app", t.client_results("app"), "read")
    assert evaluate(acl, "app", t.plan("mobilenet"), "read")
    assert not evaluate(acl, "app", t.client_results("other"), "read")
    assert not evaluate(acl, "app", t.status("app"), "write")
    assert not evaluate(acl, "app", t.assignment_desired("pi-1"), "write")


def test_unknown_and_anonymous_accounts_get_nothing(setup: MosquittoSetup) -> None:
    t, acl = Topics(), render_acl(setup)
    assert not evaluate(acl, "stranger", t.status("stranger"), "write")
    assert not evaluate(acl, "stranger", t.plan("m"), "read")
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules[0].startswith("user "), (
        "a rule before the first `user` line would apply to anonymous"
    )


def test_acl_has_no_inline_comments_and_follows_the_namespace() -> None:
    acl = render_acl(MosquittoSetup(namespace="lab-3", agents=("cam",)))
    for line in acl.splitlines():
        if line.startswith(("topic ", "pattern ")):
            assert len(line.split()) == 3, f"mosquitto would read the tail into the topic: {line!r}"
            assert line.split(" ", 2)[2].startswith(("lab-3/v1/", "$SYS/")), line
    assert evaluate(acl, "cam", Topics("lab-3").status("cam"), "write")
    assert not evaluate(acl, "cam", Topics().status("cam"), "write")


def test_production_conf_requires_auth_and_tls(setup: MosquittoSetup) -> None:
    conf = render_all(setup)["mosquitto.conf"].splitlines()
    for line in (
        "allow_anonymous false",
        "password_file /etc/mosquitto/edgeslice/passwd",
        "acl_file /etc/mosquitto/edgeslice/acl",
        "listener 8883",
        "cafile /etc/mosquitto/edgeslice/certs/ca.crt",
        "certfile /etc/mosquitto/edgeslice/certs/server.crt",
        "keyfile /etc/mosquitto/edgeslice/certs/server.key",
        "listener 1883 127.0.0.1",
        "persistence true",
        "per_listener_settings false",
    ):
        assert line in conf
    assert "allow_anonymous true" not in conf


def test_plain_test_variant_has_no_tls_and_no_extra_listener(tmp_path: Path) -> None:
    setup = MosquittoSetup(
        tls=False, bind="127.0.0.1", port=18999, local_port=None, data_dir=None,
        install_dir=str(tmp_path), run_as_user="root",
    )  # fmt: skip
    conf = render_all(setup)["mosquitto.conf"]
    assert "listener 18999 127.0.0.1\n" in conf
    assert "cafile" not in conf and "listener 1883" not in conf
    assert "persistence false" in conf and "user root" in conf
    assert f"acl_file {tmp_path}/acl" in conf


def test_readme_explains_certificates_users_and_start(setup: MosquittoSetup) -> None:
    readme = render_all(setup)["README-broker.md"]
    assert "openssl req -x509" in readme and "subjectAltName=DNS:broker.local" in readme
    assert "mosquitto_passwd -b /etc/mosquitto/edgeslice/passwd pi-2" in readme
    assert "mosquitto -c /etc/mosquitto/edgeslice/mosquitto.conf" in readme
    assert "conf.d/edgeslice" not in readme  # duplicates the packaged persistence_location


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"agents": ("pi/1",)}, "--agents"),
        ({"agents": ("pi-1",), "clients": ("pi-1",)}, "used twice"),
        ({"namespace": "a/b"}, "namespace"),
        ({"port": 1883, "local_port": 1883}, "--local-port"),
        ({"max_packet_mib": 512}, "--max-packet-mib"),
    ],
)
def test_bad_setups_are_refused_with_the_option_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        MosquittoSetup(**kwargs)


def test_split_names_accepts_commas_and_repeats() -> None:
    assert split_names(["pi-1, pi-2", "pi-3", ""]) == ("pi-1", "pi-2", "pi-3")


def test_config_command_writes_the_three_files(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = CliRunner().invoke(
        broker_group, ["config", "--out", str(out), "--agents", "pi-1,pi-2", "--namespace", "lab"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README-broker.md", "acl", "mosquitto.conf"]
    assert "topic write lab/v1/agents/pi-2/status" in (out / "acl").read_text()


def test_config_command_rejects_a_bad_agent_id(tmp_path: Path) -> None:
    result = CliRunner().invoke(broker_group, ["config", "--out", str(tmp_path), "--agents", "a b"])
    assert result.exit_code == 2
    assert "'a b' cannot be used in a topic" in result.output


def test_dev_configs_listen_on_the_given_address_only_without_size_caps() -> None:
    conf = mosquitto_dev_config("127.0.0.1", 18831).splitlines()
    assert "listener 18831 127.0.0.1" in conf
    assert "allow_anonymous true" in conf and "persistence false" in conf
    assert "set_tcp_nodelay true" in conf and "max_queued_messages 100000" in conf
    assert not any(line.startswith(("max_packet_size", "message_size_limit")) for line in conf)
    assert not any("0.0.0.0" in line for line in conf)
    assert amqtt_dev_config("127.0.0.1", 18831)["listeners"]["default"]["bind"] == "127.0.0.1:18831"
    assert amqtt_dev_config("::1", 18831)["listeners"]["default"]["bind"] == "[::1]:18831"
