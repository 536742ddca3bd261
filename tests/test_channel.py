"""The parent's end of a relay's control channel (pyprivsep.channel), over
real SEQPACKET socketpairs: queueing never blocks on a peer that does not
read, such a peer is declared dead, and every answer is checked before the
parent reads it."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from basics import wait_until
from cawire import raw_frame, unpack_header
from pyprivsep.channel import (
    SESSION_SIZE,
    STATS_SIZE,
    Answer,
    Channel,
    MalformedFrame,
    decode_sessions,
    decode_stats,
    parse_ctl_frame,
)
from pyprivsep.native import HDR_SIZE, P

TICKETS = b"k" * (P.PPS_MAX_TICKET_KEYS * P.PPS_TICKET_KEY_LEN)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the parent's end, the relay's end) of a control channel."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def ticket_frame() -> bytes:
    return raw_frame(P.PPS_CTL_TICKET_KEYS, 0, 0, b"", TICKETS)


def in_thread(work: threading.Thread, timeout: float = 60.0) -> None:
    """Run `work`; fail (instead of hanging the suite) if it blocks."""
    work.start()
    work.join(timeout)
    assert not work.is_alive(), "the parent's side of the channel blocked"


# -- a relay that never reads ----------------------------------------------------


def test_queueing_to_a_peer_that_never_reads_never_blocks_and_overflow_condemns(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    channel = Channel(ours, "relay 1", max_queue=8)
    results: list[bool] = []

    def rotate_forever() -> None:
        # far more ticket-key rotations than the kernel buffer and the queue hold
        for _ in range(100_000):
            results.append(channel.send(ticket_frame()))
            if not results[-1]:
                return

    in_thread(threading.Thread(target=rotate_forever))
    assert results[-1] is False, "the queue never filled"
    assert len(channel.queue) == 8
    why = channel.overdue(time.monotonic())
    assert why is not None and "overflow" in why


def test_a_queue_not_drained_within_the_deadline_condemns_and_draining_clears_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = Channel(ours, "relay 1", max_queue=1_000_000, drain_deadline=0.5)

    def fill() -> None:
        while not channel.queue:  # until the kernel refuses one
            assert channel.send(ticket_frame())

    in_thread(threading.Thread(target=fill))
    assert channel.overdue(time.monotonic()) is None, "condemned before its deadline"
    why = wait_until(lambda: channel.overdue(time.monotonic()), 30, "the drain deadline to pass")
    assert "did not read" in why

    # a relay that reads again is no longer overdue once the queue drains
    theirs.setblocking(False)
    while True:
        try:
            theirs.recv(65536)
        except BlockingIOError:
            break
    channel.flush()
    assert not channel.queue and channel.overdue(time.monotonic()) is None


def test_a_question_unanswered_by_its_deadline_settles_as_no_answer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    channel = Channel(ours, "relay 1")
    answers: list[Answer] = []
    assert channel.ask(P.PPS_CTL_STATS, 0.2, answers.append)
    channel.expire(time.monotonic())
    assert answers == []
    wait_until(lambda: channel.expire(time.monotonic()) or answers, 30, "the question to expire")
    assert answers == [None] and not channel.pending


# -- answers checked before use ---------------------------------------------------


def question(theirs: socket.socket) -> int:
    """The id of the question the relay end received."""
    theirs.settimeout(10)
    return unpack_header(theirs.recv(65536)).id


def answer_with(pair: tuple[socket.socket, socket.socket], type: int, frames: list[bytes]) -> list[Answer]:  # noqa: A002
    """Ask `type` over the parent's end; answer with `frames` (each made by
    a function of the question's id); return what the parent settled."""
    ours, theirs = pair
    channel = Channel(ours, "relay 1", max_sessions=2 * P.PPS_CTL_SESSIONS_MAX)
    answers: list[Answer] = []
    assert channel.ask(type, 10.0, answers.append)
    qid = question(theirs)
    for frame in frames:
        theirs.send(frame.replace(b"\xee\xee\xee\xee", qid.to_bytes(4, sys.byteorder), 1))
    wait_until(lambda: channel.on_readable() or answers, 30, "the answer to settle")
    return answers


ID = 0xEEEEEEEE  # replaced by the question's id in answer_with


def stats_answer(payload: bytes, *, length: int | None = None, version: int = 1, arg: int = 0) -> bytes:
    return raw_frame(P.PPS_CTL_STATS, arg, ID, b"", payload, length=length, version=version)


def test_a_well_formed_stats_answer_is_read(pair: tuple[socket.socket, socket.socket]) -> None:
    payload = (7).to_bytes(8, sys.byteorder) + bytes(STATS_SIZE - 8)
    (answer,) = answer_with(pair, P.PPS_CTL_STATS, [stats_answer(payload)])
    assert answer is not None
    stats = decode_stats(answer[0].payload)
    assert stats["accepted"] == 7 and len(stats["keyop_lat"]) == P.PPS_LAT_BUCKETS


@pytest.mark.parametrize(
    "frame",
    [
        stats_answer(b""),  # the 0-byte answer that made metrics serve parent memory
        stats_answer(bytes(STATS_SIZE - 1)),  # short
        stats_answer(bytes(STATS_SIZE + 1)),  # long
        stats_answer(b"", length=STATS_SIZE),  # a length field that lies: nothing follows
        stats_answer(bytes(8), length=STATS_SIZE),  # lies: less follows
        stats_answer(bytes(STATS_SIZE), length=8),  # lies: more follows
        stats_answer(bytes(STATS_SIZE), version=9),  # another protocol
        stats_answer(bytes(STATS_SIZE), arg=1),  # "more follows" for a single answer
        stats_answer(b"")[: HDR_SIZE - 1],  # not even a header
    ],
    ids=["empty", "short", "long", "len-lies-nothing", "len-lies-less", "len-lies-more", "version", "arg", "no-header"],
)
def test_malformed_stats_answers_are_rejected(pair: tuple[socket.socket, socket.socket], frame: bytes) -> None:
    assert answer_with(pair, P.PPS_CTL_STATS, [frame]) == [None]


def test_decoding_refuses_a_payload_of_the_wrong_size() -> None:
    """The last line of defence: nothing is read through a struct pointer
    into a buffer shorter (or longer) than the struct."""
    for size in (0, 1, STATS_SIZE - 1, STATS_SIZE + 1):
        with pytest.raises(MalformedFrame):
            decode_stats(bytes(size))
    with pytest.raises(MalformedFrame):
        decode_sessions(bytes(SESSION_SIZE + 1))
    for data in (b"", bytes(HDR_SIZE - 1), stats_answer(b"", length=1)):
        with pytest.raises(MalformedFrame):
            parse_ctl_frame(data)


def sessions_answer(n: int, *, more: bool = False, extra: int = 0) -> bytes:
    return raw_frame(P.PPS_CTL_SESSIONS, int(more), ID, b"", bytes(n * SESSION_SIZE + extra))


def test_sessions_answers_in_several_frames_are_collected(pair: tuple[socket.socket, socket.socket]) -> None:
    frames = [sessions_answer(P.PPS_CTL_SESSIONS_MAX, more=True), sessions_answer(3)]
    (answer,) = answer_with(pair, P.PPS_CTL_SESSIONS, frames)
    assert answer is not None
    assert sum(len(decode_sessions(f.payload)) for f in answer) == P.PPS_CTL_SESSIONS_MAX + 3


@pytest.mark.parametrize(
    "frames",
    [
        [sessions_answer(1, extra=1)],  # not a multiple of the record
        [sessions_answer(0, extra=SESSION_SIZE - 1)],
        [sessions_answer(P.PPS_CTL_SESSIONS_MAX + 1)],  # longer than any answer
        [sessions_answer(1, more=True)] * 10,  # "more follows", beyond what the relay can hold
    ],
    ids=["ragged", "partial-record", "too-long", "endless"],
)
def test_malformed_sessions_answers_are_rejected(pair: tuple[socket.socket, socket.socket], frames: list[bytes]) -> None:
    assert answer_with(pair, P.PPS_CTL_SESSIONS, frames) == [None]
