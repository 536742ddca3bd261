"""The parent's end of a relay's control channel: never blocks.

relayd's imsg buffers, in small: every frame the parent sends goes through
a bounded queue flushed with non-blocking sends as the channel drains, and
every question (PPS_CTL_STATS, PPS_CTL_SESSIONS) is a pending request with
a deadline, answered from the parent's main loop.  A child that lets its
queue overflow or stops draining it is the caller's to kill (overdue()).

Everything a relay sends is checked before use: the header's length field
against the bytes received, the payload's size against its type.  A frame
that fails is logged (rate-limited) and counts as no answer.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pyprivsep.native import HDR_SIZE, Frame, P, ffi

log = logging.getLogger("pyprivsep")

MAX_QUEUE = 64              # frames waiting for a relay; more: it is stuck
DRAIN_DEADLINE = 10.0       # seconds a relay may leave its queue undrained
RECV_BATCH = 64             # frames read per wakeup: bounded work per event
STATS_SIZE: int = ffi.sizeof("struct pps_stats")
SESSION_SIZE: int = ffi.sizeof("struct pps_session")
MAX_ANSWER = P.PPS_CTL_SESSIONS_MAX * SESSION_SIZE   # largest payload

Answer = Optional[list[Frame]]          # None: no (usable) answer
Done = Callable[[Answer], None]


class MalformedFrame(ValueError):
    """A frame from a child that cannot be used as it is."""


def parse_ctl_frame(data: bytes, max_payload: int = MAX_ANSWER) -> Frame:
    """A control frame from a relay, its header checked: long enough for a
    header, no longer than the largest answer, the length field equal to
    the bytes that follow the header, our protocol version."""
    if len(data) < HDR_SIZE:
        raise MalformedFrame(f"frame of {len(data)} bytes, shorter than a header")
    if len(data) > HDR_SIZE + max_payload:
        raise MalformedFrame(f"frame of {len(data)} bytes, longer than any answer")
    hdr = ffi.from_buffer("struct pps_hdr *", data)
    if hdr.len != len(data) - HDR_SIZE:
        raise MalformedFrame(f"length field {hdr.len} but "
                             f"{len(data) - HDR_SIZE} payload bytes")
    if hdr.version != P.PPS_PROTO_VERSION:
        raise MalformedFrame(f"protocol version {hdr.version}")
    return Frame(hdr.type, hdr.arg, hdr.id, b"", bytes(data[HDR_SIZE:]))


def check_stats(frame: Frame) -> None:
    if len(frame.payload) != STATS_SIZE or frame.arg != 0:
        raise MalformedFrame(f"stats answer of {len(frame.payload)} bytes, "
                             f"not {STATS_SIZE}")


def check_sessions(frame: Frame) -> None:
    if len(frame.payload) % SESSION_SIZE or frame.arg not in (0, 1):
        raise MalformedFrame(f"sessions answer of {len(frame.payload)} bytes, "
                             f"not a multiple of {SESSION_SIZE}")


ANSWER_CHECKS: dict[int, Callable[[Frame], None]] = {
    P.PPS_CTL_STATS: check_stats,
    P.PPS_CTL_SESSIONS: check_sessions,
}

STATS_FIELDS: tuple[str, ...] = tuple(
    name for name, _ in ffi.typeof("struct pps_stats").fields)


def decode_stats(payload: bytes) -> dict[str, Any]:
    """A checked stats payload (check_stats) as a dict; arrays as lists."""
    if len(payload) != STATS_SIZE:
        raise MalformedFrame("stats payload of the wrong size")
    st = ffi.from_buffer("struct pps_stats *", payload)
    out: dict[str, Any] = {}
    for name, f in ffi.typeof("struct pps_stats").fields:
        value = getattr(st, name)
        out[name] = list(value) if f.type.kind == "array" else int(value)
    return out


def decode_sessions(payload: bytes) -> list[Any]:
    """The struct pps_session records of a checked sessions payload."""
    if len(payload) % SESSION_SIZE:
        raise MalformedFrame("sessions payload of the wrong size")
    return [ffi.from_buffer("struct pps_session *",
                            payload[off:off + SESSION_SIZE])
            for off in range(0, len(payload), SESSION_SIZE)]


class RateLimited:
    """At most one log line per `interval` seconds; counts the rest."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} more not logged)"
        self.last, self.suppressed = now, 0
        log.warning(msg, *args)


malformed_log = RateLimited()


@dataclass
class Pending:
    """A question sent to a relay, waiting for its answer(s)."""

    type: int
    deadline: float
    done: Done
    max_frames: int
    frames: list[Frame] = field(default_factory=list)


class Channel:
    """The parent's end of one SEQPACKET control channel."""

    def __init__(self, sock: socket.socket, name: str,
                 max_queue: int = MAX_QUEUE,
                 drain_deadline: float = DRAIN_DEADLINE,
                 max_sessions: int = 10000) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.max_queue = max_queue
        self.drain_deadline = drain_deadline
        # a sessions answer is at most this many frames: one more than the
        # relay's connections need, so a lying relay cannot make it endless
        self.max_session_frames = max_sessions // P.PPS_CTL_SESSIONS_MAX + 2
        self.queue: deque[bytes] = deque()
        self.stalled_since: float | None = None
        self.overflowed = False
        self.pending: dict[int, Pending] = {}
        self.next_id = 0
        self.closed = False

    # ---- sending -------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Queue a frame and send what the channel takes now; False (and
        nothing queued) when the queue is full: the child is stuck."""
        if self.closed:
            return False
        if len(self.queue) >= self.max_queue:
            self.overflowed = True
            return False
        self.queue.append(frame)
        self.flush()
        return True

    def flush(self) -> None:
        """Send queued frames until the kernel refuses one (EAGAIN)."""
        while self.queue and not self.closed:
            try:
                self.sock.send(self.queue[0])
            except BlockingIOError:
                if self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                return
            self.queue.popleft()
            self.stalled_since = None       # progress: the child reads

    def wants_write(self) -> bool:
        return bool(self.queue)

    def overdue(self, now: float) -> str | None:
        """Why the child is to be declared dead, or None."""
        if self.overflowed:
            return f"let its control queue overflow ({self.max_queue} messages)"
        if self.stalled_since is not None and \
                now - self.stalled_since > self.drain_deadline:
            return (f"did not read its control channel for "
                    f"{self.drain_deadline:g} s")
        return None

    # ---- questions -----------------------------------------------------

    def ask(self, type: int, timeout: float, done: Done) -> bool:
        """Send a question; done(frames) on its last answer, done(None) on
        a timeout, a malformed answer or the channel closing."""
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        max_frames = self.max_session_frames \
            if type == P.PPS_CTL_SESSIONS else 1
        if not self.send(Frame(type, 0, self.next_id, b"", b"").pack()):
            done(None)
            return False
        self.pending[self.next_id] = Pending(
            type, time.monotonic() + timeout, done, max_frames)
        return True

    def on_readable(self) -> None:
        """Read what the relay sent (a bounded batch) and settle answers."""
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(HDR_SIZE + MAX_ANSWER + 1)
            except BlockingIOError:
                return
            except OSError as e:
                malformed_log.warning("%s: control channel: %s", self.name, e)
                return
            if not data:
                return
            self.on_frame(data)

    def on_frame(self, data: bytes) -> None:
        try:
            frame = parse_ctl_frame(data)
        except MalformedFrame as e:
            # unusable, and its id cannot be trusted: fail every question
            malformed_log.warning("%s: malformed answer: %s", self.name, e)
            self.fail_all()
            return
        p = self.pending.get(frame.id)
        if p is None or p.type != frame.type:
            return                  # a late answer to a question given up
        try:
            ANSWER_CHECKS[frame.type](frame)
            if len(p.frames) >= p.max_frames:
                raise MalformedFrame(f"more than {p.max_frames} answers")
        except MalformedFrame as e:
            malformed_log.warning("%s: malformed answer: %s", self.name, e)
            self.settle(frame.id, None)
            return
        p.frames.append(frame)
        if frame.arg == 0:
            self.settle(frame.id, p.frames)

    def settle(self, id: int, answer: Answer) -> None:
        p = self.pending.pop(id, None)
        if p is not None:
            p.done(answer)

    def expire(self, now: float) -> None:
        for id in [i for i, p in self.pending.items() if p.deadline <= now]:
            self.settle(id, None)

    def fail_all(self) -> None:
        for id in list(self.pending):
            self.settle(id, None)

    def next_deadline(self) -> float | None:
        times = [p.deadline for p in self.pending.values()]
        if self.stalled_since is not None:
            times.append(self.stalled_since + self.drain_deadline)
        return min(times) if times else None

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        self.fail_all()
