"""Where a client's playback of one stream is, derived from what the gateway delivered and the frame rate.

A stream plays at its frame rate, so a chunk generated long before it plays is compute nobody needed yet, and it
hides how many sessions a GPU can hold in real time. The gateway therefore lets the worker make at most
``lead_chunks`` chunks of video past the playhead (the chunk on screen counts: with the default 2, the next chunk
is generated while one plays), and tells it when each chunk must arrive: its deadline is the moment its first
frame plays, and a chunk that arrives later stalls the picture. A prompt change therefore reaches the screen
within ``lead_chunks`` chunk durations.

The model of the player: it starts the first chunk when it arrives and plays each next one when the previous
ends, or, if that one is late, when it arrives (a stall). A client that reports what it played (``played``) moves
the clock to its own. Pure: no I/O; every method takes ``now`` (seconds, wall clock, so deadlines mean the same
on the worker).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A delivered chunk and when the player shows it."""

    seq: int
    starts_s: float
    ends_s: float


class PlaybackClock:
    def __init__(self, *, fps: float, lead_chunks: int, next_seq: int = 0) -> None:
        if fps <= 0 or lead_chunks < 2:
            raise ValueError(f"fps={fps} must be > 0 and lead_chunks={lead_chunks} >= 2 (one plays, one is made)")
        self.fps = fps
        self.lead_chunks = lead_chunks
        self.next_seq = next_seq
        """The next seq to deliver; everything before it is scheduled or played."""
        self.stalls = 0
        """Chunks that arrived after the previous one finished playing (the picture froze waiting for them)."""
        self.stalled_s = 0.0
        self._queue: deque[Scheduled] = deque()
        """Delivered chunks from the one on screen on."""
        self._recent: deque[Scheduled] = deque(maxlen=64)
        """The last delivered chunks, played or not, for a client's ``played`` report."""
        self._played_until_s: float | None = None
        """When the last scheduled chunk ends; None before the first or after a pause (playback restarts)."""
        self._chunk_s = 0.0
        self._started = False
        """Whether anything was delivered since this clock began (a stream's start, a rewind, a takeover)."""

    def delivered(self, seq: int, frames: int, now: float) -> Scheduled:
        """Chunk ``seq`` (the next one) reached the client with ``frames`` frames."""
        if seq != self.next_seq:
            raise ValueError(f"delivered seq {seq}, expected {self.next_seq}")
        ends_before = self._played_until_s
        if ends_before is not None and now > ends_before:
            self.stalls += 1
            self.stalled_s += now - ends_before
        starts = now if ends_before is None else max(ends_before, now)
        duration = frames / self.fps
        self._chunk_s = duration if duration > 0 else self._chunk_s
        scheduled = Scheduled(seq, starts, starts + duration)
        self._queue.append(scheduled)
        self._recent.append(scheduled)
        self._played_until_s = scheduled.ends_s
        self.next_seq = seq + 1
        self._started = True
        return scheduled

    def played(self, seq: int, now: float) -> None:
        """The client says chunk ``seq`` started playing at ``now``: move it and what follows to its clock, behind
        our model (a player that buffered) or ahead of it. A seq not delivered lately is ignored."""
        recent = [s for s in self._recent if s.seq >= seq]
        if not recent or recent[0].seq != seq:
            return
        shift = now - recent[0].starts_s
        self._queue = deque(Scheduled(s.seq, s.starts_s + shift, s.ends_s + shift) for s in recent)
        self._recent = deque(self._queue, maxlen=self._recent.maxlen)
        self._played_until_s = self._queue[-1].ends_s

    def pause(self) -> None:
        """The client paused: what it holds plays when it resumes, so the clock starts again at the next chunk."""
        self._queue.clear()
        self._recent.clear()
        self._played_until_s = None

    def playing(self, now: float) -> int:
        """The seq on screen at ``now``; the last delivered one when the player ran dry; -1 before any."""
        while len(self._queue) > 1 and self._queue[1].starts_s <= now:
            self._queue.popleft()
        if not self._queue or self._queue[0].starts_s > now:
            return self.next_seq - 1 - len(self._queue)
        return self._queue[0].seq

    def credit_up_to(self, now: float) -> int:
        """The last seq the worker may generate now: ``lead_chunks`` chunks from the one playing, that one
        included; before anything arrived, the playhead is at the start of the first chunk wanted."""
        if not self._started:
            return self.next_seq + self.lead_chunks - 1
        return self.playing(now) + self.lead_chunks - 1

    def next_credit_at(self, now: float) -> float | None:
        """When ``credit_up_to`` next grows (the next scheduled chunk starts playing); None when it grows only
        on a delivery."""
        self.playing(now)
        upcoming = [s.starts_s for s in self._queue if s.starts_s > now]
        return upcoming[0] if upcoming else None

    def deadline(self, seq: int, now: float) -> float:
        """When chunk ``seq`` (not yet delivered) must arrive for the picture not to freeze."""
        if self._played_until_s is None:
            return now + max(0, seq - self.next_seq) * self._chunk_s  # nothing plays: each is wanted at once
        return max(self._played_until_s, now) + max(0, seq - self.next_seq) * self._chunk_s

    @property
    def chunk_s(self) -> float:
        """How long the last delivered chunk plays (0 before the first)."""
        return self._chunk_s
