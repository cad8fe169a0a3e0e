"""Batched tensor copies on a side CUDA stream, fenced by an event; the same calls do plain copies on the CPU.

Ordering rules on CUDA: the side stream first waits for the producing (current) stream, so it copies what compute
wrote; the host reads a destination only after ``CopyTicket.wait``; compute that reuses a source (a freed KV
slot) or reads a destination (a restored state) is ordered after the copies with ``CopyTicket.order_before``,
which blocks no host thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class CopyTicket:
    """Completion of one batch of copies; holds the tensors alive until the copies are done."""

    def __init__(self, event: torch.cuda.Event | None, keepalive: tuple[torch.Tensor, ...]) -> None:
        self.event = event
        self._keepalive = keepalive

    @classmethod
    def completed(cls) -> CopyTicket:
        return cls(None, ())

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        """Block the calling thread until every copy landed; only then may host code read the destinations."""
        if self.event is not None:
            self.event.synchronize()
        self._keepalive = ()

    def order_before(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream``'s later work wait for these copies, on the GPU; a no-op without CUDA work."""
        if self.event is not None and stream is not None:
            stream.wait_event(self.event)


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
        return self.copy_in_order([list(pairs)])[0]

    def copy_in_order(self, groups: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> list[CopyTicket]:
        """Copy the groups one after another, a ticket for each: a reader of one group waits for it alone. The
        last ticket lands with every group and keeps all of their tensors alive until then."""
        on_cuda = self._side_stream is not None and any(
            d.is_cuda or s.is_cuda for group in groups for d, s in group
        )
        if not on_cuda:
            for group in groups:
                for destination, source in group:
                    destination.copy_(source)
            return [CopyTicket.completed() for _ in groups]
        assert self._side_stream is not None
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        tickets = []
        with torch.cuda.stream(self._side_stream):
            for group in groups:
                for destination, source in group:
                    destination.copy_(source, non_blocking=True)
                    for tensor in (destination, source):
                        if tensor.is_cuda:
                            tensor.record_stream(self._side_stream)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self._side_stream)
                tickets.append(CopyTicket(event, tuple(tensor for pair in group for tensor in pair)))
        everything = tuple(tensor for group in groups for pair in group for tensor in pair)
        tickets[-1] = CopyTicket(tickets[-1].event, everything)
        return tickets
