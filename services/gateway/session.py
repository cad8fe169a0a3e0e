"""One streaming session as the gateway sees it: its placement, its prompt history and its fenced chunk stream.

The gateway is the session's memory between workers: it holds the prompt history and the next seq the client
needs, so when the scheduler moves the session (a new epoch on ``placement.<id>``) it re-attaches it on the new
worker at exactly that seq and the stream continues with no gap and no duplicate. Control operations run one at a
time under a lock; the chunk path never takes it. Credit stops whenever the worker must not run ahead: while
paused, while attaching, while a prompt change is in flight (so the change lands at a fixed chunk).
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from services.common import subjects
from services.common.chunk_frame import read_header
from services.common.errors import (
    InvalidField,
    InvalidState,
    ProtocolError,
    TurboServeError,
    Unavailable,
)
from services.common.messages import (
    AttachSession,
    ChangePrompt,
    DetachSession,
    OpenSession,
    Placement,
    RecordPrompt,
    Reply,
    RequestChunks,
    SessionClaim,
    UpdateSession,
)
from services.common.telemetry.chunks import GatewayChunkSpans
from services.common.wire import Message, decode
from services.gateway.fencing import ChunkFence, Verdict
from services.gateway.outgoing import OutgoingChunk, OutgoingChunks, SlowConsumer
from services.gateway.playback import PlaybackClock
from services.gateway.rpc import publish, request

log = logging.getLogger("turboserve.gateway.session")

M = TypeVar("M", bound=Message)

Status = Literal["starting", "active", "idle", "closed"]


class SessionListener(Protocol):
    """The connection driving a session, told what happens to it outside the client's own requests."""

    def session_moved(self, session: GatewaySession) -> None: ...

    def session_failed(self, session: GatewaySession, error: TurboServeError) -> None: ...

    def session_overflowed(self, session: GatewaySession, error: SlowConsumer) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionSpec:
    session_id: str
    owner: str
    prompt: str
    seed: int
    model: str


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What the gateway's settings give every session it drives."""

    credit_chunks: int
    queue_chunks: int
    request_timeout_s: float
    gateway_id: str = "gateway"
    lease_s: float = 0.0
    max_open_per_owner: int = 0
    playback_fps: float = 16.0
    lead_chunks: int = 2
    paced: bool = True

    def playback_clock(self, next_seq: int) -> PlaybackClock:
        """A fresh model of the client's player, whose next chunk is ``next_seq``."""
        return PlaybackClock(fps=self.playback_fps, lead_chunks=self.lead_chunks, next_seq=next_seq)


class GatewaySession:
    """A session's NATS side: open, attach, credit, prompt, pause, resume, move and close."""

    def __init__(self, spec: SessionSpec, limits: SessionLimits, nats: NatsClient, *,
                 handed_over: Callable[[GatewaySession], None] | None = None) -> None:
        self.spec = spec
        self.session_id = spec.session_id
        self.prompts: list[tuple[int, str]] = [(0, spec.prompt)]
        self.status: Status = "starting"
        self.worker_id = ""
        self.fence: ChunkFence[bytes] = ChunkFence(epoch=0, credit_chunks=limits.credit_chunks)
        self.outgoing = OutgoingChunks(limits.queue_chunks)
        self.listener: SessionListener | None = None
        self.dropped: collections.Counter[str] = collections.Counter()
        self._nats = nats
        self._limits = limits
        self._timeout_s = limits.request_timeout_s
        self._lock = asyncio.Lock()
        self._credit_open = False
        self._resend_from: int | None = None
        self._attached_epoch = 0
        self._progress_s = time.monotonic()
        """When a chunk last arrived or credit was last granted: a session silent past that is re-credited."""
        self._persisted = False
        self._subscriptions: list[Subscription] = []
        self._background: set[asyncio.Task[None]] = set()
        self.traces = GatewayChunkSpans(spec.session_id)
        self._handed_over = handed_over
        """Told when another gateway drives the session now, so the one holding this copy drops it."""
        self.playback = limits.playback_clock(0)
        self._frames_of: dict[int, int] = {}
        """Frame count of each chunk the fence holds, for the playback clock when it is delivered."""
        self._pacing: asyncio.TimerHandle | None = None
        """Wakes the credit when the next chunk starts playing."""

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    # --- client requests -----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Persist and place the session, attach it on its worker and start the credit; closes it on failure."""
        self.traces.start_session(self.spec.model)
        async with self._lock, self.traces.operation("open"):
            try:
                self._subscriptions = [
                    await self._nats.subscribe(subjects.chunks(self.session_id), cb=self._on_chunk),
                    await self._nats.subscribe(subjects.placement(self.session_id), cb=self._on_placement),
                ]
                spec, limits = self.spec, self._limits
                opened = OpenSession(spec.session_id, spec.owner, spec.prompt, spec.seed, spec.model,
                                     limits.gateway_id, limits.lease_s, limits.max_open_per_owner)
                placement = await self._request(subjects.SCHED_OPEN, opened, Placement)
                self._persisted = True
                await self._attach(placement)
            except BaseException:  # cancelled or refused: leave nothing half-open behind
                await self._shutdown("its start failed")
                raise
            self.status = "active"
            log.info("event=session_open worker=%s epoch=%d", self.worker_id, self.epoch)
            await self._open_credit()

    async def take_over(self, claim: SessionClaim, next_seq: int | None) -> None:
        """Drive a session another gateway opened (its client reconnected here, or that gateway died): idle,
        with the recorded prompt history, at ``next_seq`` (what the client holds) or the recorded resume point.
        The resume that follows re-attaches it on its worker at exactly that seq."""
        async with self._lock, self.traces.operation("take_over"):
            self._subscriptions = [
                await self._nats.subscribe(subjects.chunks(self.session_id), cb=self._on_chunk),
                await self._nats.subscribe(subjects.placement(self.session_id), cb=self._on_placement),
            ]
            self.prompts = [(seq, prompt) for seq, prompt in claim.prompts]
            self.fence = ChunkFence(epoch=0, credit_chunks=self._limits.credit_chunks,
                                    next_seq=claim.next_seq if next_seq is None else next_seq)
            self.playback = self._limits.playback_clock(self.fence.next_seq)
            self._persisted = True  # worker_id stays empty: the resume's placement attaches it afresh
            self.status = "idle"
            log.info("event=session_taken_over next_seq=%d worker=%s", self.fence.next_seq, claim.worker_id)

    async def change_prompt(self, prompt: str) -> int:
        """Use ``prompt`` from the first chunk the worker was never asked for; returns that seq."""
        async with self._lock, self.traces.operation("change_prompt"):
            self._require("active", "idle")
            self._credit_open = False
            from_seq = self.fence.highest_requested + 1
            try:
                changed = ChangePrompt(self.session_id, self.epoch, from_seq, prompt)
                await self._request(subjects.worker_control(self.worker_id), changed, Reply)
            finally:
                if self.status == "active":
                    await self._open_credit()
            if self.prompts[-1][0] == from_seq:
                self.prompts[-1] = (from_seq, prompt)
            else:
                self.prompts.append((from_seq, prompt))
            try:  # so a gateway that takes the session over re-attaches it with its whole history
                await self._request(subjects.SCHED_PROMPT, RecordPrompt(self.session_id, from_seq, prompt), Reply)
            except TurboServeError as exc:
                log.warning("session=%s prompt change not recorded by the scheduler: %s", self.session_id, exc)
            return from_seq

    async def pause(self) -> int:
        """Stop the credit; returns the seq the stream stops at: every chunk before it was requested and still
        arrives, none from it on until a resume."""
        async with self._lock, self.traces.operation("pause"):
            self._require("active")
            await self._go_idle()
            return self.fence.granted_up_to + 1

    def forget_listener(self, listener: SessionListener) -> None:
        """The driving connection is gone; a connection that already took the session over stays its listener."""
        if self.listener is listener:
            self.listener = None

    async def suspend(self, still_unclaimed: Callable[[], bool]) -> None:
        """The driving connection dropped: stop producing and keep the state for a resume, unless another
        connection took the session over while we waited for the lock."""
        async with self._lock, self.traces.operation("suspend"):
            if self.status == "active" and still_unclaimed():
                await self._go_idle()

    async def resume(self) -> None:
        """Tell the scheduler, re-attach if it answers with a newer placement (moved while idle), restart credit.
        A session still active (the client's new connection came before the old one's end was seen) just gets
        its credit again, from where ``rewind_to`` put it."""
        async with self._lock, self.traces.operation("resume"):
            if self.status == "active":
                await self._open_credit()
                return
            self._require("idle")
            update = UpdateSession(self.session_id, "active", self.fence.next_seq, gateway_id=self._limits.gateway_id)
            answer = await self._request(subjects.SCHED_UPDATE, update, Message)
            if isinstance(answer, Placement) and answer.epoch > self._attached_epoch:
                await self._attach(answer)
            self.status = "active"
            await self._open_credit()

    async def played(self, seq: int) -> None:
        """The client's player started chunk ``seq`` now: pace to its clock rather than our model of it."""
        self.playback.played(seq, time.time())
        await self._grant_credit()

    def rewind_to(self, next_seq: int) -> None:
        """The client wants ``next_seq`` next (one past the last chunk it holds): chunks handed to a connection
        that was cut before they reached the client are delivered again. Call it before a new connection starts
        writing the session's queue, which may hold chunks past ``next_seq``."""
        if next_seq > self.fence.next_seq:
            raise InvalidField(f"next_seq {next_seq} is past what session {self.session_id!r} has produced "
                               f"({self.fence.next_seq})")
        if next_seq == self.fence.next_seq:
            return
        log.info("session=%s rewinds to seq=%d from %d: the client did not get them", self.session_id, next_seq,
                 self.fence.next_seq)
        self.outgoing.clear()
        self._frames_of.clear()
        self.fence.rewind(next_seq)
        self.playback = self._limits.playback_clock(next_seq)
        self._resend_from = next_seq

    async def close(self, reason: str = "closed by its client") -> None:
        """Detach from the worker and mark the session closed; idempotent."""
        async with self._lock, self.traces.operation("close"):
            await self._shutdown(reason)

    # --- NATS callbacks ------------------------------------------------------------------------------------

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            header, _ = read_header(msg.data)
        except ProtocolError as exc:
            self._drop("malformed", f"unreadable chunk frame: {exc}")
            return
        if header.session_id != self.session_id:
            self._drop("foreign", f"chunk of session {header.session_id} on our subject")
            return
        verdict = self.fence.offer(header.epoch, header.seq, msg.data)
        if verdict not in (Verdict.READY, Verdict.HELD):
            self._drop(verdict.value, f"chunk epoch={header.epoch} seq={header.seq} (at epoch={self.epoch})")
            return
        self._progress_s = time.monotonic()
        self._frames_of[header.seq] = len(header.frame_sizes)
        self.traces.arrived(header.seq, msg.headers)
        self._deliver_ready()
        await self._grant_credit()

    async def _on_placement(self, msg: Msg) -> None:
        try:
            placement = decode(msg.data, expect=Placement)
        except ProtocolError as exc:
            log.warning("session=%s unreadable placement: %s", self.session_id, exc)
            return
        assert isinstance(placement, Placement)
        async with self._lock, self.traces.operation("move"):
            if self.status == "closed" or placement.epoch <= self._attached_epoch:
                return  # open() holds the lock, so a placement racing it is judged against open's epoch
            if placement.gateway_id and placement.gateway_id != self._limits.gateway_id:
                await self._let_go(placement.gateway_id)
                return
            if not placement.worker_id:
                return  # a claim's notice: it tells the other gateways, and this one already has the claim's answer
            log.info("session=%s moves to worker=%s epoch=%d reason=%r next_seq=%d", self.session_id,
                     placement.worker_id, placement.epoch, placement.reason, self.fence.next_seq)
            try:
                await self._attach(placement)
            except TurboServeError as exc:  # idle, so a resume asks the scheduler again and retries the attach
                log.info("session=%s attach to worker=%s failed: %s", self.session_id, placement.worker_id, exc)
                if self.status != "active":
                    return  # its client paused it and is waiting for nothing: the resume is where this heals
                await self._go_idle()
                if self.listener is not None:
                    self.listener.session_failed(self, exc)
                return
            if self.status == "active":
                await self._open_credit()
            if self.listener is not None:
                self.listener.session_moved(self)

    # --- internals -----------------------------------------------------------------------------------------

    def _require(self, *allowed: Status) -> None:
        if self.status not in allowed:
            raise InvalidState(f"session {self.session_id!r} is {self.status}; this needs {' or '.join(allowed)}")

    async def _attach(self, placement: Placement) -> None:
        """Make ``placement`` the session's home at the next undelivered seq, then let the old worker go."""
        try:
            subjects.check_token("worker_id", placement.worker_id)
        except ValueError as exc:
            raise Unavailable(f"scheduler sent an unusable placement: {exc}") from None
        old_worker, old_epoch = self.worker_id, self._attached_epoch
        self._credit_open = False
        self._resend_from = None
        self.fence.rebase(placement.epoch)
        spec = self.spec
        attach = AttachSession(
            self.session_id, placement.epoch, spec.seed, spec.model, self.fence.next_seq, tuple(self.prompts)
        )
        await self._request(subjects.worker_control(placement.worker_id), attach, Reply)
        self.worker_id, self._attached_epoch = placement.worker_id, placement.epoch
        if old_worker and old_worker != placement.worker_id:
            self._in_background(self._detach(old_worker, old_epoch))

    async def _go_idle(self) -> None:
        self.status = "idle"
        self._credit_open = False
        self._stop_pacing()
        self.playback.pause()
        await self._take_back_credit()
        update = UpdateSession(self.session_id, "idle", self.fence.granted_up_to + 1,
                               gateway_id=self._limits.gateway_id)
        try:
            await self._request(subjects.SCHED_UPDATE, update, Message)
        except TurboServeError as exc:  # the pause holds locally; the scheduler reconciles from heartbeats
            log.warning("session=%s could not report idle to the scheduler: %s", self.session_id, exc)

    async def _let_go(self, gateway_id: str) -> None:
        """Another gateway claimed the session (its client resumed there): stop listening at once rather than
        receive, and fence off, its chunks until this copy's linger ends. Its worker state and its row are the new
        gateway's now, so neither is touched."""
        listener = self.listener
        await self._shutdown(f"taken over by gateway {gateway_id}", handed_over=True)
        if listener is not None:
            listener.session_failed(self, InvalidState(
                f"session {self.session_id!r} was resumed on another connection (gateway {gateway_id})"))
        if self._handed_over is not None:
            self._handed_over(self)

    async def _shutdown(self, reason: str, *, handed_over: bool = False) -> None:
        """Tear down in an order that a cancellation can interrupt and a second call can finish."""
        if self.status == "closed":
            return
        self._credit_open = False
        self._stop_pacing()
        self.listener = None
        self.outgoing.clear()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await _quietly(subscription.unsubscribe())
        closed_here = not self._persisted and not handed_over
        if self._persisted and not handed_over:  # first: if another gateway holds it now, its worker state is not ours
            update = UpdateSession(self.session_id, "closed", self.fence.next_seq, reason, self._limits.gateway_id)
            try:
                await self._request(subjects.SCHED_UPDATE, update, Message)
                closed_here = True
            except TurboServeError as exc:  # handed over, or no scheduler: the lease running out closes it there
                log.info("session=%s not closed by this gateway: %s", self.session_id, exc)
        if self._attached_epoch and closed_here:
            await _quietly(self._detach(self.worker_id, self._attached_epoch))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.status = "closed"
        log.info("event=session_closed next_seq=%d reason=%r", self.fence.next_seq, reason)
        self.traces.close("closed")

    async def _detach(self, worker_id: str, epoch: int) -> None:
        try:
            await self._request(subjects.worker_control(worker_id), DetachSession(self.session_id, epoch), Reply)
        except TurboServeError as exc:
            log.info("session=%s detach from worker=%s epoch=%d failed: %s", self.session_id, worker_id, epoch, exc)

    def _deliver_ready(self) -> None:
        while (frame := self.fence.peek_ready()) is not None:
            try:
                self.outgoing.put(OutgoingChunk(self.fence.next_seq, frame))
            except SlowConsumer as exc:
                self._on_slow_consumer(exc)
                return
            seq = self.fence.next_seq
            self.fence.advance()
            self.playback.delivered(seq, self._frames_of.pop(seq, 0), time.time())

    def _on_slow_consumer(self, error: SlowConsumer) -> None:
        """Refuse the chunk, stop the credit and remember to ask for it again when the client resumes."""
        self._credit_open = False
        self.fence.revoke_credit()
        self._resend_from = self.fence.next_seq
        log.warning("session=%s slow consumer at seq=%d: %s", self.session_id, self.fence.next_seq, error)
        if self.listener is not None:
            self.listener.session_overflowed(self, error)

    async def _open_credit(self) -> None:
        self._credit_open = True
        self._progress_s = time.monotonic()
        await self._grant_credit()

    async def refresh_credit(self, stalled_after_s: float) -> None:
        """Ask again for what is owed when nothing arrived for ``stalled_after_s``: a credit message or a chunk
        lost in flight (a NATS node died under it) would otherwise stall the stream for good. Idempotent: the
        worker replays from the next seq we need, and the fence drops whatever arrives twice."""
        owed = self.fence.granted_up_to >= self.fence.next_seq
        if not (self._credit_open and self.status == "active" and owed):
            return
        if time.monotonic() - self._progress_s < stalled_after_s:
            return
        self._progress_s = time.monotonic()
        credit = RequestChunks(self.session_id, self.epoch, self.fence.granted_up_to, self.fence.next_seq)
        log.info("session=%s stalled at seq=%d; credit sent again", self.session_id, self.fence.next_seq)
        try:
            await publish(self._nats, subjects.worker_credit(self.worker_id), credit)
        except Unavailable as exc:
            log.warning("session=%s credit refresh not sent: %s", self.session_id, exc)

    async def _take_back_credit(self) -> None:
        """Generation stops within one chunk of a pause: the worker keeps credit only for the chunk the client
        needs next (it may be in the batch running now); what it made past that is asked for again on resume."""
        stop_at = self.fence.next_seq
        if not self.worker_id or self.fence.granted_up_to <= stop_at:
            return
        self.fence.take_back(stop_at)
        self._resend_from = stop_at + 1
        try:
            await publish(self._nats, subjects.worker_credit(self.worker_id),
                          RequestChunks(self.session_id, self.epoch, stop_at, exact=True))
        except Unavailable as exc:  # the worker then makes the little credit it had left; nothing is lost
            log.warning("session=%s credit not taken back: %s", self.session_id, exc)

    def _stop_pacing(self) -> None:
        if self._pacing is not None:
            self._pacing.cancel()
            self._pacing = None

    def _pace(self, now: float) -> None:
        """Grant again when the next chunk starts playing (that is when the credit may grow)."""
        self._stop_pacing()
        if not (self._limits.paced and self._credit_open and self.status == "active"):
            return
        at = self.playback.next_credit_at(now)
        if at is not None:
            self._pacing = asyncio.get_running_loop().call_later(
                max(0.0, at - now) + 0.001, lambda: self._in_background(self._grant_credit()))

    async def _grant_credit(self) -> None:
        if not self._credit_open:
            return
        now = time.time()
        paced = self._limits.paced
        up_to = self.fence.grant(self.playback.credit_up_to(now) if paced else None)
        self._pace(now)
        if up_to is None:
            return
        resend_from, self._resend_from = self._resend_from, None
        due_unix_ms = self.playback.deadline(up_to, now) * 1e3 if paced else 0.0
        credit = RequestChunks(self.session_id, self.epoch, up_to, resend_from, due_unix_ms=due_unix_ms,
                               interval_ms=self.playback.chunk_s * 1e3)
        headers = self.traces.credit_headers(self.fence.next_seq, up_to, self.epoch, self.worker_id)
        try:
            await publish(self._nats, subjects.worker_credit(self.worker_id), credit, headers)
        except Unavailable as exc:
            log.warning("session=%s credit up to seq=%d not sent: %s", self.session_id, up_to, exc)

    async def _request(self, subject: str, msg: Message, expect: type[M]) -> M:
        return await request(self._nats, subject, msg, expect, timeout_s=self._timeout_s)

    def _in_background(self, work: collections.abc.Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        log.debug("session=%s dropped %s: %s", self.session_id, reason, detail)


async def _quietly(work: collections.abc.Awaitable[object]) -> None:
    """Best effort during teardown: a peer that is gone must not stop the rest of the cleanup."""
    try:
        await work
    except (TurboServeError, NatsError) as exc:
        log.info("cleanup step failed: %s: %s", type(exc).__name__, exc)
