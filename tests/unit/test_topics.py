"""The topic table's inbox: the sending client's id is a topic segment, built and parsed here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from edgeslice.broker.protocol.errors import TopicError
from edgeslice.broker.protocol.topics import Kind, ParsedTopic, Topics

T = Topics("ns")
_ID = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z")


@given(agent=_ID, client=_ID)
def test_an_inbox_topic_names_agent_and_client_and_parses_back(agent: str, client: str) -> None:
    topic = T.inbox(agent, client)
    assert topic == f"ns/v1/agents/{agent}/inbox/{client}"
    assert T.parse(topic) == ParsedTopic(Kind.INBOX, agent_id=agent, name=client)
    assert topic_matches_sub(T.agent_inbox(agent), topic)
    assert topic_matches_sub(T.all_inboxes(), topic)
    assert topic_matches_sub(T.all_inboxes(client), topic)


def test_an_inbox_without_a_client_segment_is_not_in_the_table() -> None:
    for topic in (
        "ns/v1/agents/pi-1/inbox",
        "ns/v1/agents/pi-1/inbox/a/b",
        "ns/v1/agents/pi-1/inbox/+",
    ):
        with pytest.raises(TopicError):
            T.parse(topic)


@pytest.mark.parametrize("client", ["", "a/b", "+", "#", "x" * 65, "with space"])
def test_a_client_id_that_cannot_be_a_segment_is_refused(client: str) -> None:
    with pytest.raises(TopicError, match="client id"):
        T.inbox("pi-1", client)


def test_the_per_client_filter_only_matches_that_client() -> None:
    assert not topic_matches_sub(T.all_inboxes("app"), T.inbox("pi-1", "other"))
    assert T.all_inboxes("%u") == "ns/v1/agents/+/inbox/%u"
