"""Batched tensor copies on a side CUDA stream, fenced by an event; the same calls do plain copies on the CPU.

Ordering rules on CUDA: the side stream first waits for the producing (current) stream, so it copies what compute
wrote; the host reads a destination only after ``CopyTicket.wait``; compute that reuses a source (a freed KV
slot) or reads a destination (a restored state) is ordered after the copies with ``CopyTicket.order_before``,
which blocks no host thread.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CopyTicket:
    """Completion of one batch of copies; holds the tensors alive until the copies are done."""

    def __init__(self, event: torch.cuda.Event | None, keepalive: tuple[torch.Tensor, ...]) -> None:
        self._event = event
        self._keepalive = keepalive

    @classmethod
    def completed(cls) -> CopyTicket:
        return cls(None, ())

    def done(self) -> bool:
        return self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        """Block the calling thread until every copy landed; only then may host code read the destinations."""
        if self._event is not None:
            self._event.synchronize()
        self._keepalive = ()

    def order_before(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream``'s later work wait for these copies, on the GPU; a no-op without CUDA work."""
        if self._event is not None and stream is not None:
            stream.wait_event(self._event)


class StreamCopier:
    """Copies between host and one device; on CUDA through a dedicated side stream, elsewhere synchronously."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def compute_stream(self) -> torch.cuda.Stream | None:
        """The stream model work runs on (the current one), or None off CUDA."""
        return torch.cuda.current_stream(self.device) if self._side_stream is not None else None

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> CopyTicket:
        """Copy every (destination, source) pair; returns when issued on CUDA, when finished elsewhere."""
        pairs = list(pairs)
        if self._side_stream is None or not any(d.is_cuda or s.is_cuda for d, s in pairs):
            for destination, source in pairs:
                destination.copy_(source)
            return CopyTicket.completed()
        producer = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(producer)
        with torch.cuda.stream(self._side_stream):
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)
                for tensor in (destination, source):
                    if tensor.is_cuda:
                        tensor.record_stream(self._side_stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._side_stream)
        keepalive = tuple(tensor for pair in pairs for tensor in pair)
        return CopyTicket(event, keepalive)
