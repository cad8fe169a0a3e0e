"""Which traces are kept: every session, control and decision trace, and a share of the per-chunk traces.

Chunk traces are the volume: three spans per chunk plus one batch trace per forward pass, against a handful per
session. Recording and exporting every one of them costs about 0.5 ms of CPU per chunk across gateway and worker
(``bench/e2e.py``), CPU that on a small machine is taken from the model, and a matching load on the trace store;
a tenth of them still gives an operator several complete chunk traces per second per worker, and the latency
histograms see every chunk anyway. So a chunk trace is kept with probability
``TURBOSERVE_TRACE_CHUNK_RATIO`` (default 0.1; 1 keeps them all) decided once at its root by its trace id, every
span in it follows that decision across services (W3C sampled flag), and a batch trace is kept exactly when one
of the chunk traces it links to is, so every kept chunk trace can be followed to its forward pass and encode.
Everything else is always kept. Setting the standard ``OTEL_TRACES_SAMPLER`` replaces this sampler entirely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from services.common.config import env_float

CHUNK_RATIO_ENV = "TURBOSERVE_TRACE_CHUNK_RATIO"
DEFAULT_CHUNK_RATIO = 0.1
CHUNK_ROOT = "gateway.chunk"
BATCH_ROOT = "worker.batch"


class ChunkTraceRatio(Sampler):
    """The root sampler: chunk roots by trace-id ratio, batch roots by their links, any other root always."""

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{CHUNK_RATIO_ENV}={ratio} must be between 0 and 1")
        self.ratio = ratio
        self._chunks = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if name == CHUNK_ROOT:
            return self._chunks.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if name == BATCH_ROOT:
            kept = any(link.context.trace_flags.sampled for link in links or ())
            return SamplingResult(Decision.RECORD_AND_SAMPLE if kept else Decision.DROP, attributes, trace_state)
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"ChunkTraceRatio{{{self.ratio}}}"


def sampler_from_env(environ: Mapping[str, str]) -> Sampler | None:
    """TurboServe's sampler, or None where ``OTEL_TRACES_SAMPLER`` is set and the SDK should build that one.
    Raises ConfigError for a ratio that is not a number in [0, 1]."""
    if environ.get("OTEL_TRACES_SAMPLER"):
        return None
    ratio = env_float(CHUNK_RATIO_ENV, DEFAULT_CHUNK_RATIO, low=0.0, high=1.0, environ=environ)
    return ParentBased(root=ChunkTraceRatio(ratio))
