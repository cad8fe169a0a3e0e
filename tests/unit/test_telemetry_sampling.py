"""Chunk traces are sampled as a whole across services; session, control and decision traces are always kept."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.chunk_frame import ChunkHeader, pack_chunk
from services.common.config import ConfigError
from services.common.telemetry.chunks import GatewayChunkSpans, WorkerChunkTraces
from services.common.telemetry.sampling import sampler_from_env
from services.common.telemetry.tracing import install, span, switch, tracer


@dataclass
class Pending:
    session_id: str
    next_seq: int


@pytest.fixture
def sampled(request: pytest.FixtureRequest) -> Iterator[InMemorySpanExporter]:
    """Tracing on with TurboServe's sampler at the ratio the test is parametrized with; restores the previous
    tracer afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler_from_env({"TURBOSERVE_TRACE_CHUNK_RATIO": str(request.param)}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = switch.tracer
    install(provider)
    try:
        yield exporter
    finally:
        switch.tracer, switch.enabled = previous, False


def frame(session_id: str, seq: int) -> bytes:
    header = ChunkHeader(
        session_id=session_id, epoch=1, seq=seq, first_frame=seq * 12, width=8, height=8, frame_sizes=(3,),
        timings_ms={"ready_at_unix_ms": time.time() * 1e3, "queue_ms": 1.0, "model_ms": 3.0}, worker_id="w",
    )
    return pack_chunk(header, [b"abc"])


def stream(chunks: int) -> int:
    """``chunks`` chunks of one session through gateway and worker, one batch each, as the services run them;
    returns how many NATS messages (credits and chunk frames) carried trace headers."""
    gateway, worker = GatewayChunkSpans("s1"), WorkerChunkTraces()
    gateway.start_session("tiny")
    with_headers = 0
    for seq in range(chunks):
        credit = gateway.credit_headers(seq, seq, epoch=1, worker_id="w")
        worker.credited("s1", credit)
        with worker.batch("w", [Pending("s1", seq)]), span("model.forward"):
            pass
        published = worker.published("s1", frame("s1", seq))
        gateway.arrived(seq, published)
        gateway.delivered(seq)
        with_headers += (credit is not None) + (published is not None)
    gateway.close("closed")
    return with_headers


@pytest.mark.parametrize("sampled", [0.25], indirect=True)
def test_a_share_of_chunk_traces_is_kept_whole_and_every_kept_chunk_has_its_batch(
    sampled: InMemorySpanExporter,
) -> None:
    with_headers = stream(400)
    spans = sampled.get_finished_spans()
    kept = {s.context.trace_id for s in spans if s.name == "gateway.chunk"}
    assert with_headers == 2 * len(kept), "only a kept chunk's credit and frame carry trace headers"
    assert 60 <= len(kept) <= 140, f"{len(kept)} of 400 chunk traces kept at ratio 0.25"
    for name in ("worker.chunk", "gateway.delivery"):
        assert {s.context.trace_id for s in spans if s.name == name} == kept, f"{name} follows the chunk's root"
    batches = [s for s in spans if s.name == "worker.batch"]
    assert len(batches) == len(kept) and all(link.context.trace_id in kept for b in batches for link in b.links)
    assert len([s for s in spans if s.name == "model.forward"]) == len(kept), "a dropped batch drops its phases"
    assert len([s for s in spans if s.name == "gateway.session"]) == 1, "the session trace is always kept"


@pytest.mark.parametrize("sampled", [0.0], indirect=True)
def test_at_ratio_zero_no_chunk_trace_is_kept_but_control_traces_are(sampled: InMemorySpanExporter) -> None:
    assert stream(20) == 0, "no message carries the context of a dropped trace"
    with tracer().start_as_current_span("gateway.open"):
        pass
    assert sorted(s.name for s in sampled.get_finished_spans()) == ["gateway.open", "gateway.session"]


def test_the_standard_sampler_variable_takes_over_and_a_bad_ratio_is_refused() -> None:
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on", "TURBOSERVE_TRACE_CHUNK_RATIO": "0"}) is None
    with pytest.raises(ConfigError, match="not a number"):
        sampler_from_env({"TURBOSERVE_TRACE_CHUNK_RATIO": "often"})
    with pytest.raises(ConfigError, match="out of bounds"):
        sampler_from_env({"TURBOSERVE_TRACE_CHUNK_RATIO": "1.5"})
