"""Database calls as spans: wrap a store so each of its coroutine methods runs in a ``db.<method>`` client span.

Wrapping the store, not the driver, names the span after what the call means (``db.move_session``) rather than
its SQL, and needs no instrumentation package. With tracing off the proxy is not built at all.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from opentelemetry.trace import SpanKind

from services.common.telemetry.tracing import switch, tracer

T = TypeVar("T")


class TracedStore:
    """Forwards every attribute to the wrapped store; coroutine methods are timed in a span each."""

    def __init__(self, store: object, system: str) -> None:
        self._store = store
        self._system = system

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attribute):
            return attribute
        traced = self._traced(name, attribute)
        setattr(self, name, traced)  # look each method up once
        return traced

    def _traced(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        attributes = {"db.system": self._system, "db.operation": name}

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            # the span records a raised exception and marks itself an error on its own
            with tracer().start_as_current_span(f"db.{name}", kind=SpanKind.CLIENT, attributes=attributes):
                return await method(*args, **kwargs)

        return call


def traced_store(store: T, system: str = "postgresql") -> T:
    """``store`` itself when tracing is off, else a proxy with the same interface that traces every call."""
    if not switch.enabled:
        return store
    return cast(T, TracedStore(store, system))
