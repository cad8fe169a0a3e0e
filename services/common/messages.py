"""Messages between services over NATS: session control, chunk requests, placement, worker heartbeats.

Every message that concerns a session carries its ``epoch``: the placement generation from PostgreSQL. A worker
ignores requests of an older epoch, and the gateway drops chunks of an older epoch, so a session that moved can
never have a stale owner reach its client (STYLE habit 4).

The flows these messages carry (the contract between gateway, scheduler and worker):


- Client connects to the gateway WebSocket; token via `Authorization: Bearer <t>` header or `?token=<t>` query
  (browsers cannot set headers). Valid tokens: env TURBOSERVE_TOKENS (comma separated). Missing/invalid -> HTTP 401.
- start: gateway makes session_id (uuid4 hex), requests subjects.SCHED_OPEN with OpenSession(owner=sha256 of
  token, model=settings.model) -> scheduler persists the row, picks a worker, replies Placement(worker_id, epoch=1)
  (or Reply(ok=False, code="unavailable"|...) ). Gateway subscribes subjects.chunks(session_id), requests
  subjects.worker_control(worker_id) with AttachSession(next_seq=0, prompts=((0, prompt),)) -> Reply(ok=True), then
  publishes credit RequestChunks(up_to_seq=next_expected + window - 1) on subjects.worker_credit(worker_id), and sends
  the client {"type":"started", session_id, epoch, worker_id, model, width, height, fps, credit_chunks}.
- The worker generates every seq <= up_to_seq in order (batched with its other sessions) and publishes each chunk
  frame (chunk_frame.pack_chunk: header + JPEG frames) on subjects.chunks(session_id). It keeps the last few encoded
  chunks so RequestChunks(resend_from_seq=n) replays them. It ignores messages whose epoch is older than its own.
- Gateway delivery: read_header only; drop epoch < current; seq < next_expected -> duplicate, drop; seq ==
  next_expected -> forward the bytes unchanged as a binary WS frame, then flush buffered successors; seq >
  next_expected -> buffer (bounded) and ask resend_from_seq=next_expected. After delivering, extend credit.
  If credit is outstanding and nothing arrives for a few seconds, re-send RequestChunks with resend_from_seq.
- prompt change: from_seq = (highest seq already requested) + 1, recorded in the session's prompt history, sent as
  ChangePrompt to the worker (request/reply) before any credit past from_seq is given.
- pause: stop giving credit; UpdateSession(status="idle", next_seq) to SCHED_UPDATE; tell the client
  {"type":"paused", session_id, next_seq}. The worker keeps the state (nothing is detached).
- resume: UpdateSession(status="active") to SCHED_UPDATE -> Placement. If worker or epoch changed, send
  AttachSession(next_seq=next_expected, prompt history) to the new worker. Resume credit. {"type":"resumed",...}.
- close: UpdateSession(status="closed"), DetachSession to the worker, unsubscribe, {"type":"closed", session_id}.
- The scheduler may move a session on its own (worker lost, later migration): it publishes Placement on
  subjects.placement(session_id) (wildcard subjects.PLACEMENTS). The gateway then sends AttachSession(next_seq=
  next_expected, full prompt history) to the new worker and re-issues credit; the new worker imports the latest
  state_store snapshot at or before next_seq (or starts from seed at chunk 0 without one) and regenerates the
  chunks since deterministically, so the client sees no gap and no duplicate.
- Workers publish WorkerHeartbeat on subjects.SCHED_HEARTBEAT every second (capacity, sessions -> chunks
  produced, recent (batch size, chunk latency ms) samples) and WorkerGone on clean shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.common.errors import InvalidField
from services.common.wire import Message, message

SessionStatus = Literal["active", "idle", "closed"]
MAX_PROMPT_CHARS = 2000


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise InvalidField("prompt must not be empty")
    if "\x00" in prompt:  # PostgreSQL text cannot hold it, and no tokenizer wants it
        raise InvalidField("prompt must not contain NUL characters")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidField(f"prompt of {len(prompt)} characters exceeds the limit of {MAX_PROMPT_CHARS}")


@dataclass(frozen=True, slots=True)
class PromptSegment:
    """The prompt in force from chunk ``from_seq`` on; a session's prompt history is a list of these."""

    from_seq: int
    prompt: str


# --- gateway -> scheduler ------------------------------------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class OpenSession(Message):
    """Ask the scheduler to persist a new session and place it."""

    TYPE = "open_session"
    session_id: str
    owner: str
    prompt: str
    seed: int
    model: str
    gateway_id: str = ""
    """The gateway that holds the client's connection; it keeps the session's lease alive."""
    lease_s: float = 0.0
    """How long the lease lasts without a renewal; 0: no lease (the session is only closed by a request)."""
    max_open_per_owner: int = 0
    """Refuse with limit_exceeded when the owner already holds this many open sessions; 0: no limit."""

    def check(self) -> None:
        _check_prompt(self.prompt)
        if self.lease_s < 0 or self.max_open_per_owner < 0:
            raise InvalidField("lease_s and max_open_per_owner must not be negative")


@message
@dataclass(frozen=True, slots=True)
class ClaimSession(Message):
    """A gateway takes over a session of ``owner`` that another gateway (maybe dead) held: the answer is the
    session as the scheduler records it, and from now on this gateway's lease keeps it."""

    TYPE = "claim_session"
    session_id: str
    owner: str
    gateway_id: str
    lease_s: float = 0.0


@message
@dataclass(frozen=True, slots=True)
class SessionClaim(Message):
    """What a gateway needs to drive a session it did not open: its spec, its prompt history, the seq its
    client was last known to need, and where it lives (``worker_id`` empty: not placed)."""

    TYPE = "session_claim"
    session_id: str
    seed: int
    model: str
    status: SessionStatus
    prompts: tuple[tuple[int, str], ...]
    next_seq: int
    worker_id: str = ""
    epoch: int = 0


@message
@dataclass(frozen=True, slots=True)
class RecordPrompt(Message):
    """A prompt change the worker accepted, from chunk ``from_seq`` on: kept so any gateway can re-attach the
    session with its whole history."""

    TYPE = "record_prompt"
    session_id: str
    from_seq: int
    prompt: str

    def check(self) -> None:
        _check_prompt(self.prompt)
        if self.from_seq < 0:
            raise InvalidField("from_seq must not be negative")


@message
@dataclass(frozen=True, slots=True)
class ListSessions(Message):
    """A token's open sessions (active or idle, lingering included), so its client can resume or close those a
    lost page or a crashed program left behind."""

    TYPE = "list_sessions"
    owner: str


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session_id: str
    status: SessionStatus
    next_seq: int
    """The seq its client was last known to need: where a ``resume`` without ``next_seq`` continues."""
    prompt: str
    """The latest prompt, cut to ``SUMMARY_PROMPT_CHARS``."""


SUMMARY_PROMPT_CHARS = 120
MAX_LISTED_SESSIONS = 100
"""A list answer stays far under a message's size limit: a token holds 4 open sessions by default, 1024 at most."""


@message
@dataclass(frozen=True, slots=True)
class SessionList(Message):
    TYPE = "session_list"
    sessions: tuple[SessionSummary, ...]
    more: int = 0
    """Open sessions left out past ``MAX_LISTED_SESSIONS`` (the newest are listed)."""


@message
@dataclass(frozen=True, slots=True)
class GatewayLease(Message):
    """A gateway's periodic renewal of the sessions it holds, with the seq each one's client needs next."""

    TYPE = "gateway_lease"
    gateway_id: str
    lease_s: float
    next_seqs: dict[str, int]


@message
@dataclass(frozen=True, slots=True)
class UpdateSession(Message):
    """A session changed status (pause -> idle, resume -> active, close -> closed) at chunk ``next_seq``."""

    TYPE = "update_session"
    session_id: str
    status: SessionStatus
    next_seq: int
    reason: str = ""
    """Why, in words, for the scheduler's decision log (a close by the client, a linger that ran out, ...)."""
    gateway_id: str = ""
    """The gateway asking; refused (invalid_state) when another gateway has taken the session over."""


@message
@dataclass(frozen=True, slots=True)
class Placement(Message):
    """Where a session lives now; a higher epoch supersedes every earlier placement of the session."""

    TYPE = "placement"
    session_id: str
    worker_id: str
    epoch: int
    reason: str = ""
    gateway_id: str = ""
    """The gateway that drives the session now ('' when none holds it): any other gateway lets its copy go."""


@message
@dataclass(frozen=True, slots=True)
class Reply(Message):
    """Generic answer to a request: ok, or an error code and message the caller can surface."""

    TYPE = "reply"
    ok: bool
    code: str = ""
    detail: str = ""


# --- gateway -> worker ---------------------------------------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class AttachSession(Message):
    """Make a session resident on a worker for ``epoch``, resuming at ``next_seq``.

    A worker that does not hold the state imports the session's latest snapshot taken at or before ``next_seq``
    (else builds it from seed) and regenerates the chunks from there to ``next_seq`` without sending them, so a
    re-placed session continues with no gap and no duplicate.
    """

    TYPE = "attach_session"
    session_id: str
    epoch: int
    seed: int
    model: str
    next_seq: int
    prompts: tuple[tuple[int, str], ...]

    def check(self) -> None:
        if self.next_seq < 0 or self.epoch < 1:
            raise InvalidField(f"next_seq={self.next_seq} and epoch={self.epoch} must be >= 0 and >= 1")
        if not self.prompts or self.prompts[0][0] != 0:
            raise InvalidField("prompt history must start at chunk 0")
        for _, prompt in self.prompts:
            _check_prompt(prompt)


@message
@dataclass(frozen=True, slots=True)
class ChangePrompt(Message):
    """Use ``prompt`` from chunk ``from_seq`` on (fixed to a chunk, so the result is deterministic)."""

    TYPE = "change_prompt"
    session_id: str
    epoch: int
    from_seq: int
    prompt: str

    def check(self) -> None:
        _check_prompt(self.prompt)


@message
@dataclass(frozen=True, slots=True)
class RequestChunks(Message):
    """Credit: the gateway wants every chunk up to and including ``up_to_seq``; re-asking replays."""

    TYPE = "request_chunks"
    session_id: str
    epoch: int
    up_to_seq: int
    resend_from_seq: int | None = None
    due_unix_ms: float = 0.0
    """When chunk ``up_to_seq`` must reach the client to play without a stall (0: no deadline, as soon as may be);
    an earlier seq is due ``interval_ms`` earlier per seq. The worker's batches serve the earliest deadline first."""
    interval_ms: float = 0.0
    """How long one chunk plays."""
    exact: bool = False
    """``up_to_seq`` replaces the credit even if lower (a pause takes back what was not generated yet); otherwise
    credit only grows."""


@message
@dataclass(frozen=True, slots=True)
class DetachSession(Message):
    """Drop a session's state from the worker (closed, or moved away under a newer epoch)."""

    TYPE = "detach_session"
    session_id: str
    epoch: int


# --- worker -> scheduler -------------------------------------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class WorkerHeartbeat(Message):
    """A worker's liveness and load; measured latencies feed the scheduler's latency model."""

    TYPE = "worker_heartbeat"
    worker_id: str
    kind: str
    model: str
    capacity: int
    sessions: dict[str, int] = field(default_factory=dict)  # session_id -> chunks produced
    active_sessions: int = 0
    recent_batches: tuple[tuple[int, float], ...] = ()  # (batch size, chunk latency ms)
    recent_restores: tuple[tuple[int, float], ...] = ()  # (state bytes, ms) of restores from host memory
    started_at_s: float = 0.0
    draining: bool = False
    offloaded: tuple[str, ...] = ()  # sessions whose state is in host memory or the state store, slot freed
    state_bytes: dict[str, int] = field(default_factory=dict)  # session_id -> bytes a move of its state carries
    node: str = ""  # the machine the GPU is in: migrations within a node ride its GPU link

    def check(self) -> None:
        if self.capacity < 1:
            raise InvalidField(f"capacity must be >= 1, got {self.capacity}")


@message
@dataclass(frozen=True, slots=True)
class WorkerGone(Message):
    """A worker leaves cleanly (shutdown); the scheduler re-places its sessions without waiting for a timeout."""

    TYPE = "worker_gone"
    worker_id: str
