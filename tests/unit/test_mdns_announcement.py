"""Which mDNS announcements may become seeds (cached/peers/mdns.py ``check_announcement``).

Only one of our cluster, signed with our cluster key over (node id, cluster, address, timestamp),
fresh within the window, whose address is the source of a packet that carried it. Each other case
gives its reason, the label of ``cached_mdns_rejected_total``; whatever the TXT holds, the check
answers (never raises). The network half (senders seen for real) is in
tests/system/test_mdns_trust_netns.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from zeroconf import DNSIncoming, DNSOutgoing, DNSText, RecordUpdate, const

from cached.metrics import MDNS_REJECT_REASONS
from cached.peers.auth import ClusterKey
from cached.peers.mdns import SERVICE, Announcement, TxtSenders, announcement_mac, check_announcement, reannounce_due

TOKEN = "unit-cluster-token-0123456789abcdef"
KEY = ClusterKey(TOKEN, "alpha")
NOW = 1_700_000_000.0
WINDOW = 600.0


def signed(
    node_id: str = "node-b",
    address: str = "198.18.0.2:7471",
    ts: int = int(NOW),
    key: ClusterKey = KEY,
    cluster: str = "alpha",
) -> dict[str, str]:
    return {
        "node_id": node_id,
        "cluster": cluster,
        "addr": address,
        "hv": "3",
        "hc": "1",
        "ts": str(ts),
        "mac": announcement_mac(key, node_id, cluster, address, str(ts)),
    }


def check(props: dict[str, str], senders: set[str] = frozenset({"198.18.0.2"})) -> Announcement | str:  # type: ignore[assignment]
    return check_announcement(props, key=KEY, cluster="alpha", senders=set(senders), now=NOW, window_s=WINDOW)


def test_a_signed_fresh_announcement_from_its_own_address_is_accepted() -> None:
    assert check(signed()) == Announcement(node_id="node-b", address="198.18.0.2:7471")
    # Clock skew inside the window either way is fine.
    assert isinstance(check(signed(ts=int(NOW - WINDOW + 1))), Announcement)
    assert isinstance(check(signed(ts=int(NOW + WINDOW - 1))), Announcement)
    # IPv6, bracketed, with a zone on the sender's side.
    six = signed(address="[fe80::1]:7471")
    assert check(six, senders={"fe80::1%2"}) == Announcement(node_id="node-b", address="[fe80::1]:7471")


def test_the_spoof_as_it_was_done_an_unsigned_announcement_of_our_cluster() -> None:
    props = {"node_id": "evil", "cluster": "alpha", "addr": "198.18.0.66:8080", "hv": "1", "hc": "1"}
    assert check(props, senders={"198.18.0.66"}) == "unsigned"
    props["ts"] = str(int(NOW))
    assert check(props, senders={"198.18.0.66"}) == "unsigned"
    props["mac"] = "0" * 64
    assert check(props, senders={"198.18.0.66"}) == "bad_mac"


def test_a_replayed_signed_txt_with_another_address_fails_the_mac() -> None:
    props = signed()
    props["addr"] = "198.18.0.66:8080"
    assert check(props, senders={"198.18.0.66"}) == "bad_mac"


def test_a_replayed_signed_txt_from_another_host_fails_the_source_check() -> None:
    assert check(signed(), senders={"198.18.0.66"}) == "source_mismatch"
    assert check(signed(), senders=set()) == "source_mismatch"  # sender unknown: never trusted
    assert check(signed(address="node-b.example:7471"), senders={"198.18.0.2"}) == "source_mismatch"


def test_stale_other_cluster_and_other_key() -> None:
    assert check(signed(ts=int(NOW - WINDOW - 1))) == "stale"
    assert check(signed(ts=int(NOW + WINDOW + 1))) == "stale"
    assert check(signed(cluster="beta", key=ClusterKey(TOKEN, "beta"))) == "other_cluster"
    # Right cluster name, wrong token (or the right token of another cluster re-labelled).
    assert check(signed(key=ClusterKey("another-token-0123456789abcdef", "alpha"))) == "bad_mac"
    assert check(signed(key=ClusterKey(TOKEN, "beta"))) == "bad_mac"
    # The MAC binds every signed part: changing the node id or the timestamp breaks it.
    for field, value in (("node_id", "node-c"), ("ts", str(int(NOW) + 1))):
        props = signed()
        props[field] = value
        assert check(props) == "bad_mac", field
    # A token holder's garbage timestamp is malformed, not a crash.
    assert check(signed(ts="soon")) == "malformed"  # type: ignore[arg-type]


@given(
    st.dictionaries(st.sampled_from(["node_id", "cluster", "addr", "ts", "mac", "hv", "x"]), st.text(max_size=80)),
    st.sets(st.text(max_size=40), max_size=3),
)
def test_any_txt_gives_an_answer_never_an_exception(props: dict[str, str], senders: set[str]) -> None:
    verdict = check(props, senders=senders)
    assert isinstance(verdict, Announcement) or verdict in MDNS_REJECT_REASONS


def test_reannounce_keeps_the_timestamp_fresh_and_holdings_news_prompt() -> None:
    due = lambda since, moved: reannounce_due(since_s=since, moved=moved, min_update_s=1.0, reannounce_s=60.0)  # noqa: E731
    assert not due(0.5, True)  # rate-limited
    assert due(1.0, True)
    assert not due(59.0, False)
    assert due(60.0, False)  # nothing changed, but the receivers' window must not run out
    assert 60.0 < WINDOW  # a re-announce always lands inside the window


def _response(*records: DNSText, source: str) -> DNSIncoming:
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for r in records:
        out.add_answer_at_time(r, 0)
    return DNSIncoming(out.packets()[0], (source, 5353))


def test_txt_senders_finds_the_packet_each_record_came_in() -> None:
    """zeroconf's record listeners get records, not packets; TxtSenders finds the packet among the
    listeners' last messages by identity (wire-parsed by zeroconf itself here)."""
    name = f"node-b.{SERVICE}"
    txt = lambda text: DNSText(name, const._TYPE_TXT, const._CLASS_IN, 4500, text)  # noqa: E731
    from_b = _response(txt(b"\x05a=one"), source="198.18.0.2")
    from_x = _response(txt(b"\x05a=one"), source="198.18.0.66")  # the same TXT, replayed elsewhere
    other_type = _response(
        DNSText("x._other._tcp.local.", const._TYPE_TXT, const._CLASS_IN, 4500, b"\x05a=one"), source="198.18.0.9"
    )
    zc = SimpleNamespace(
        engine=SimpleNamespace(protocols=[SimpleNamespace(last_message=None), SimpleNamespace(last_message=from_b)])
    )
    senders = TxtSenders()
    senders.async_update_records(zc, 0.0, [RecordUpdate(r, None) for r in from_b.answers()])
    assert senders.senders(name.upper(), b"\x05a=one") == {"198.18.0.2"}
    zc.engine.protocols[0].last_message = from_x
    senders.async_update_records(zc, 0.0, [RecordUpdate(r, None) for r in from_x.answers()])
    assert senders.senders(name, b"\x05a=one") == {"198.18.0.2", "198.18.0.66"}
    assert senders.senders(name, b"\x05a=two") == set()
    # A record from no packet we can see (or of another service type) is never given a sender.
    senders.async_update_records(
        zc, 0.0, [RecordUpdate(txt(b"\x05a=two"), None)] + [RecordUpdate(r, None) for r in other_type.answers()]
    )
    assert senders.senders(name, b"\x05a=two") == set() and senders.unknown == 1
