"""``transfer.wants``: the bookkeeping behind origin single-flight, driven message by message.

Two nodes' registries exchange messages in every order the network allows; whatever the order,
each ends up counting the other, a stale "not wanting" never undoes a newer want, a leaver's
pieces stay known as held, and a late "piece done" from a leaver does not make it a wanter again.
"""

from __future__ import annotations

import pytest

from cached.transfer.wants import WantAnswer, WantMessage, Wants

KEY = "cd" * 32
SIZE, PIECE = 16 << 20, 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("b_registers_first", [True, False])
def test_two_nodes_starting_together_always_count_each_other(b_registers_first: bool) -> None:
    a, b = Wants(clock=Clock()), Wants(clock=Clock())
    if b_registers_first:
        b.register(KEY, SIZE, PIECE, held=[])
    a.register(KEY, SIZE, PIECE, held=[])
    asked_at = a.clock()
    answer = b.receive("a", a.message(KEY))  # a's question reaches b
    a.take_answer("b", answer, asked_at)
    if not b_registers_first:
        b.register(KEY, SIZE, PIECE, held=[])
        b_asked = b.clock()
        b.take_answer("a", a.receive("b", b.message(KEY)), b_asked)
    assert set(a.get(KEY).others) == {"b"}  # type: ignore[union-attr]
    assert set(b.get(KEY).others) == {"a"}  # type: ignore[union-attr]


def test_claims_travel_both_ways() -> None:
    a, b = Wants(), Wants()
    wa = a.register(KEY, SIZE, PIECE, held=[0, 1])
    wa.claimed.add(5)
    b.register(KEY, SIZE, PIECE, held=[])
    answer = a.receive("b", b.message(KEY))
    assert answer.wants and answer.claimed == {0, 1, 5}
    b.take_answer("a", answer, 0.0)
    assert b.get(KEY).others["a"].claimed == {0, 1, 5}  # type: ignore[union-attr]


def test_a_stale_not_wanting_answer_does_not_undo_a_newer_want() -> None:
    clock = Clock()
    a = Wants(clock=clock)
    a.register(KEY, SIZE, PIECE, held=[])
    asked_at = a.clock()  # a asks b; b is not registered yet and answers "no"...
    a.receive("b", WantMessage(KEY, True, SIZE, PIECE, frozenset()))  # ...then b registers and asks a
    a.take_answer("b", WantAnswer(KEY, False, frozenset()), asked_at)  # the old "no" lands last
    assert "b" in a.get(KEY).others  # type: ignore[operator]


def test_a_leaver_is_dropped_its_pieces_known_held_and_a_late_done_message_ignored() -> None:
    a = Wants()
    a.register(KEY, SIZE, PIECE, held=[])
    a.receive("b", WantMessage(KEY, True, SIZE, PIECE, frozenset({3})))
    a.receive("b", WantMessage(KEY, False, SIZE, PIECE, frozenset(range(16))))
    w = a.get(KEY)
    assert w is not None and "b" not in w.others and w.holders["b"] == frozenset(range(16))
    a.receive("b", WantMessage(KEY, True, SIZE, PIECE, frozenset({3}), {7: b"\x01" * 32}))
    assert "b" not in w.others


def test_askers_are_remembered_for_a_file_not_wanted_yet_and_released_wants_are_forgotten() -> None:
    a = Wants()
    assert not a.receive("b", WantMessage(KEY, True, SIZE, PIECE, frozenset())).wants
    w = a.register(KEY, SIZE, PIECE, held=[])
    assert set(w.others) == {"b"}
    assert a.release(KEY) == ["b"]
    assert a.get(KEY) is None


@pytest.mark.parametrize(
    "body",
    [
        {"key": "x", "want": True, "size": 1, "piece_size": 1},
        {"key": KEY, "want": 1, "size": 1, "piece_size": 1},
        {"key": KEY, "want": True, "size": 2**63, "piece_size": 1},
        {"key": KEY, "want": True, "size": 1, "piece_size": 1, "claimed": "all"},
        {"key": KEY, "want": True, "size": 1, "piece_size": 1, "done": {"0": "zz"}},
        {"key": KEY, "want": True, "size": 1, "piece_size": 1, "done": {"-1": "ab" * 32}},
        {"key": KEY, "want": True, "size": 1, "piece_size": 1, "steal": -1},
        {"key": KEY, "want": True, "size": 1, "piece_size": 1, "steal": "7"},
    ],
)
def test_malformed_messages_are_refused(body: dict) -> None:
    with pytest.raises(ValueError):
        WantMessage.from_json(body)


def test_a_message_round_trips() -> None:
    m = WantMessage(KEY, True, SIZE, PIECE, frozenset({1, 2}), {3: b"\xab" * 32})
    assert WantMessage.from_json(m.to_json()) == m
    asked = WantMessage(KEY, True, SIZE, PIECE, frozenset(), steal=9)
    assert WantMessage.from_json(asked.to_json()) == asked
    answer = WantAnswer(KEY, True, frozenset({1}), granted=True)
    assert WantAnswer.from_json(answer.to_json()) == answer
    with pytest.raises(ValueError):
        WantAnswer.from_json({"key": KEY, "wants": True, "granted": "yes"})
