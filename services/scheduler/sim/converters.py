"""Converters from the shared public traces into session traces. No public streaming-video trace exists, so a
chat request stands for an active period; every assumption is a named field of ``ConversionAssumptions``.

* RAGPulse: sessions by ``session_id``, split where the gap to the next request exceeds ``session_split_gap_s``.
* Mooncake: conversations inferred from prefix hashes: request j continues request i when j's ``hash_ids``
  start with all of i's full 512-token blocks (at least two); the longest such i is the parent.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from services.scheduler.sim.trace import SessionTrace, Trace, TraceError

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class ConversionAssumptions:
    """A request's active period lasts ceil(output_length / output_tokens_per_chunk) chunks of
    ``chunk_interval_s`` (12 frames at 16 FPS); overlapping requests merge; a session departs ``linger_s``
    after its last active period; every session holds ``kv_bytes`` of DiT KV cache and ``vae_cache_bytes`` of
    VAE decoder cache. The defaults are 4 GB in all, split as Wan2.1-1.3B's Self-Forcing config splits its own
    7.2 GB (KV 73.6%); ``turboserve simulate --model-config NAME`` takes a model's own figures instead."""

    output_tokens_per_chunk: float = 4.0
    chunk_interval_s: float = 0.75
    session_split_gap_s: float = 1800.0
    linger_s: float = 120.0
    kv_bytes: int = 2_945_000_000
    vae_cache_bytes: int = 1_055_000_000

    @property
    def state_bytes(self) -> int:
        return self.kv_bytes + self.vae_cache_bytes


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    try:
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise TraceError(f"cannot read trace {path}: {error}") from error


def _active_s(output_tokens: int, assumptions: ConversionAssumptions) -> float:
    chunks = max(1, math.ceil(output_tokens / assumptions.output_tokens_per_chunk))
    return chunks * assumptions.chunk_interval_s


def _sessions_from_requests(
    name: str, requests: dict[str, list[tuple[float, float]]], assumptions: ConversionAssumptions
) -> list[SessionTrace]:
    """Requests (start_s, active_s) grouped by session: overlapping ones merge, a long gap splits a session."""
    sessions: list[SessionTrace] = []
    for key, items in requests.items():
        periods: list[list[float]] = []
        part = 0
        for start_s, length_s in sorted(items):
            if periods and start_s - periods[-1][1] > assumptions.session_split_gap_s:
                sessions.append(_session(f"{name}:{key}:{part}", periods, assumptions))
                periods, part = [], part + 1
            if periods and start_s <= periods[-1][1]:
                periods[-1][1] = max(periods[-1][1], start_s + length_s)
            else:
                periods.append([start_s, start_s + length_s])
        sessions.append(_session(f"{name}:{key}:{part}", periods, assumptions))
    return sessions


def _session(session_id: str, periods: list[list[float]], assumptions: ConversionAssumptions) -> SessionTrace:
    return SessionTrace(
        session_id,
        tuple((a, b) for a, b in periods),
        periods[-1][1] + assumptions.linger_s,
        assumptions.state_bytes,
    )


def _trace(name: str, sessions: list[SessionTrace], assumptions: ConversionAssumptions) -> Trace:
    start_s = min(s.active_periods[0][0] for s in sessions)
    end_s = max(s.active_periods[-1][1] for s in sessions)
    return Trace(name, tuple(sessions), start_s, end_s, {"source": name, **asdict(assumptions)})


def load_ragpulse(path: Path, assumptions: ConversionAssumptions = ConversionAssumptions()) -> Trace:
    requests: dict[str, list[tuple[float, float]]] = {}
    for index, record in enumerate(_read_jsonl(path)):
        try:
            requests.setdefault(str(record["session_id"]), []).append(
                (float(str(record["timestamp"])), _active_s(int(str(record["output_length"])), assumptions))
            )
        except (KeyError, ValueError) as error:
            raise TraceError(f"record {index} of {path} is not a RAGPulse record: {error!r}") from None
    return _trace("ragpulse", _sessions_from_requests("ragpulse", requests, assumptions), assumptions)


@dataclass(slots=True)
class _PrefixNode:
    """A node of the block-hash trie; ``owner`` is the latest request whose full blocks end here."""

    children: dict[int, _PrefixNode]
    owner: int = -1


def load_mooncake(path: Path, assumptions: ConversionAssumptions = ConversionAssumptions()) -> Trace:
    records = sorted(_read_jsonl(path), key=lambda r: float(str(r["timestamp"])))
    trie = _PrefixNode({})
    chain_of: list[int] = []
    requests: dict[str, list[tuple[float, float]]] = {}
    for index, record in enumerate(records):
        hash_ids = record["hash_ids"]
        if not isinstance(hash_ids, list):
            raise TraceError(f"record {index} of {path} has no hash_ids list")
        blocks = [int(b) for b in hash_ids]
        node, parent = trie, -1
        for depth, block in enumerate(blocks, start=1):
            child = node.children.get(block)
            if child is None:
                break
            node = child
            if depth >= 2 and node.owner >= 0:
                parent = node.owner
        chain = chain_of[parent] if parent >= 0 else index
        chain_of.append(chain)
        full_blocks = int(str(record["input_length"])) // MOONCAKE_BLOCK_TOKENS
        node = trie
        for block in blocks[:full_blocks]:
            node = node.children.setdefault(block, _PrefixNode({}))
        if full_blocks >= 2:
            node.owner = index
        requests.setdefault(str(chain), []).append(
            (float(str(record["timestamp"])) / 1000.0, _active_s(int(str(record["output_length"])), assumptions))
        )
    return _trace("mooncake", _sessions_from_requests("mooncake", requests, assumptions), assumptions)


def load_sessions(path: Path, assumptions: ConversionAssumptions = ConversionAssumptions()) -> Trace:
    """The simulator's own format, JSON Lines, one session a line: ``{"session_id": "a", "active": [[0, 30],
    [95, 180]], "departure_s": 300, "state_bytes": 4000000000}``; times in seconds, periods sorted and
    disjoint; ``departure_s`` defaults to the last period's end plus ``linger_s``, ``state_bytes`` to the
    assumptions'."""
    sessions: list[SessionTrace] = []
    for index, record in enumerate(_read_jsonl(path)):
        try:
            periods = tuple((float(a), float(b)) for a, b in record["active"])  # type: ignore[attr-defined]
            last_end = periods[-1][1] if periods else 0.0
            sessions.append(SessionTrace(
                str(record["session_id"]), periods,
                float(str(record.get("departure_s", last_end + assumptions.linger_s))),
                int(str(record.get("state_bytes", assumptions.state_bytes))),
            ))
        except (KeyError, TypeError, ValueError) as error:
            raise TraceError(f"line {index + 1} of {path} is not a session record: {error!r}") from None
    if not sessions:
        raise TraceError(f"{path} holds no session")
    return _trace(path.stem, sessions, assumptions)


def load_requests(path: Path, assumptions: ConversionAssumptions = ConversionAssumptions()) -> Trace:
    """CSV with a header naming ``session_id``, ``start_s`` and ``duration_s`` (other columns are ignored): each
    row one active period (a request, a generation); a session's rows merge where they overlap and split
    into two sessions at a gap over ``session_split_gap_s``, as the chat traces are converted."""
    requests: dict[str, list[tuple[float, float]]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                session_id, start_s, duration_s = _request(row, line, path)
                requests.setdefault(session_id, []).append((start_s, duration_s))
    except OSError as error:
        raise TraceError(f"cannot read trace {path}: {error}") from error
    if not requests:
        raise TraceError(f"{path} holds no request")
    return _trace(path.stem, _sessions_from_requests(path.stem, requests, assumptions), assumptions)


def _request(row: dict[str, str], line: int, path: Path) -> tuple[str, float, float]:
    try:
        duration_s = float(row["duration_s"])
        if not duration_s > 0:
            raise ValueError(f"duration_s {duration_s} is not positive")
        return str(row["session_id"]), float(row["start_s"]), duration_s
    except (KeyError, TypeError, ValueError) as error:
        raise TraceError(f"line {line} of {path} is not a request (session_id, start_s, duration_s): "
                         f"{error!r}") from None


TRACE_FORMATS = {"sessions": load_sessions, "requests": load_requests, "ragpulse": load_ragpulse,
                 "mooncake": load_mooncake}
