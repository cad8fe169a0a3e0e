"""Converters from the shared public traces into session traces. No public streaming-video trace exists, so a
chat request stands for an active period; every assumption is a named field of ``ConversionAssumptions``.

* RAGPulse: sessions by ``session_id``, split where the gap to the next request exceeds ``session_split_gap_s``.
* Mooncake: conversations inferred from prefix hashes: request j continues request i when j's ``hash_ids``
  start with all of i's full 512-token blocks (at least two); the longest such i is the parent.
"""

from __future__ import annotations

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
    after its last active period; every session holds ``state_bytes`` (12-frame Wan2.1-1.3B window)."""

    output_tokens_per_chunk: float = 4.0
    chunk_interval_s: float = 0.75
    session_split_gap_s: float = 1800.0
    linger_s: float = 120.0
    state_bytes: int = 3_500_000_000


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    try:
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise TraceError(f"cannot read trace {path}: {error}") from error


def _sessions_from_requests(
    name: str, requests: dict[str, list[tuple[float, int]]], assumptions: ConversionAssumptions
) -> list[SessionTrace]:
    sessions: list[SessionTrace] = []
    for key, items in requests.items():
        periods: list[list[float]] = []
        part = 0
        for start_s, output_tokens in sorted(items):
            chunks = max(1, math.ceil(output_tokens / assumptions.output_tokens_per_chunk))
            length_s = chunks * assumptions.chunk_interval_s
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
    requests: dict[str, list[tuple[float, int]]] = {}
    for record in _read_jsonl(path):
        requests.setdefault(str(record["session_id"]), []).append(
            (float(str(record["timestamp"])), int(str(record["output_length"])))
        )
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
    requests: dict[str, list[tuple[float, int]]] = {}
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
            (float(str(record["timestamp"])) / 1000.0, int(str(record["output_length"])))
        )
    return _trace("mooncake", _sessions_from_requests("mooncake", requests, assumptions), assumptions)
