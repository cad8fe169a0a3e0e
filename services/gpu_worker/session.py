"""A session resident on this worker: its model slot, prompt schedule, credit and the chunks kept for replay.

Generation and emission are separate cursors. ``next_seq`` is the next chunk the model makes; ``next_send_seq``
the next chunk sent to the gateway. Every generated chunk goes through the replay buffer, so a resend, a new
epoch and normal streaming all emit from the same place, and a chunk is never sent with a stale epoch.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from services.common.errors import InvalidState
from services.gpu_worker.model.interface import SessionHandle


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    seq: int
    first_frame: int
    frames: list[bytes]
    timings_ms: dict[str, float]


@dataclass
class ResidentSession:
    session_id: str
    epoch: int
    seed: int
    handle: SessionHandle
    prompts: list[tuple[int, str]]
    replay_depth: int
    active_prompt: str = ""
    next_seq: int = 0
    next_send_seq: int = 0
    credit_up_to: int = -1
    silent_until: int = 0
    ready_since_s: float | None = None
    due_unix_ms: float = 0.0
    """When chunk ``due_seq`` must reach its client (0: no deadline given); earlier seqs ``interval_ms`` apart."""
    due_seq: int = 0
    interval_ms: float = 0.0
    offloaded: bool = False
    """The state is in host memory or the state store, not in ``handle``'s slot; restore before generating."""
    replay: deque[EncodedChunk] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.active_prompt = self.prompts[0][1]

    def wants_generation(self) -> bool:
        """Ready for the next batch: credited by the gateway, or still catching up silently."""
        return not self.offloaded and (self.next_seq <= self.credit_up_to or self.next_seq < self.silent_until)

    def deadline_ms(self, seq: int) -> float | None:
        """When chunk ``seq`` must reach the client to play without a stall (unix ms), if the gateway said."""
        if not self.due_unix_ms:
            return None
        return self.due_unix_ms - (self.due_seq - seq) * self.interval_ms

    def prompt_for(self, seq: int) -> str:
        index = bisect.bisect_right([start for start, _ in self.prompts], seq) - 1
        return self.prompts[index][1]

    def change_prompt(self, from_seq: int, prompt: str) -> None:
        if from_seq < self.next_seq:
            raise InvalidState(f"chunk {from_seq} of {self.session_id} is already generated (next is {self.next_seq})")
        kept = [(start, text) for start, text in self.prompts if start < from_seq]
        self.prompts = [*kept, (from_seq, prompt)]

    def record(self, chunk: EncodedChunk) -> None:
        self.replay.append(chunk)
        while len(self.replay) > self.replay_depth:
            self.replay.popleft()
        self.next_seq = chunk.seq + 1

    def can_replay_from(self, seq: int) -> bool:
        return seq >= self.next_seq or (bool(self.replay) and self.replay[0].seq <= seq)

    def sendable(self) -> list[EncodedChunk]:
        """Chunks to emit now (credited, generated, not yet sent), advancing the send cursor past them."""
        start = max(self.next_send_seq, self.silent_until)
        out = [c for c in self.replay if start <= c.seq <= self.credit_up_to]
        if out:
            self.next_send_seq = out[-1].seq + 1
        return out
