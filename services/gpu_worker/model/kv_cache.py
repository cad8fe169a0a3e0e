"""Per-slot cache storage: the rolling self-attention KV (sink rows + ring), the prompt's cross-attention K/V, and
the clean latents of the chunks the KV holds (what a KV re-cache on a prompt switch recomputes from).

Row layout of a slot, in tokens: rows [0, sink_tokens) hold the first ``sink_chunks`` chunks forever; rows
[sink_tokens, capacity) are a ring of the last ``window_chunks`` chunks, a chunk always occupying one whole,
aligned segment of it. A session that has finished n chunks has rows [0, min(n * chunk_tokens, capacity)) valid.
Latents use the same layout one segment per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.gpu_worker import kernels
from services.gpu_worker.copies import CopyTicket, StreamCopier
from services.gpu_worker.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Where each chunk's K/V rows live in a slot; pure arithmetic on the config."""

    config: ModelConfig

    def first_row(self, chunk_index: int) -> int:
        """The first of the ``chunk_tokens`` consecutive rows chunk ``chunk_index`` writes."""
        c = self.config
        if chunk_index < c.sink_chunks:
            return chunk_index * c.chunk_tokens
        return c.sink_tokens + ((chunk_index - c.sink_chunks) % c.window_chunks) * c.chunk_tokens

    def segment(self, chunk_index: int) -> int:
        """The chunk-sized segment of the slot chunk ``chunk_index`` occupies."""
        return self.first_row(chunk_index) // self.config.chunk_tokens

    def cached_chunks(self, chunks_done: int) -> list[int]:
        """The chunks whose K/V the cache holds after ``chunks_done`` chunks, oldest first."""
        c = self.config
        sink = list(range(min(chunks_done, c.sink_chunks)))
        return sink + list(range(max(c.sink_chunks, chunks_done - c.window_chunks), chunks_done))

    def valid_rows(self, chunks_done: int) -> int:
        """Rows holding K/V after ``chunks_done`` chunks: what attention reads and what export sends."""
        return min(chunks_done * self.config.chunk_tokens, self.config.cache_capacity_tokens)

    def rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        """Sorted distinct rows that chunks first..last (inclusive) overwrite."""
        if first_chunk < 0 or last_chunk < first_chunk:
            raise ValueError(f"chunk range {first_chunk}..{last_chunk} must satisfy 0 <= first <= last")
        c = self.config
        distinct_chunks = min(last_chunk - first_chunk + 1, c.sink_chunks + c.window_chunks)
        starts = {self.first_row(first_chunk + i) for i in range(distinct_chunks)}
        return [row for start in sorted(starts) for row in range(start, start + c.chunk_tokens)]


class CachePools:
    """Device tensors for all slots: ``k_pools[layer]``/``v_pools[layer]`` [slots, capacity, heads, head_dim],
    ``cross_k[layer]``/``cross_v[layer]`` [slots, text_len, heads, head_dim], ``latents`` [slots, segments,
    channels, frames_per_chunk, height, width]."""

    def __init__(self, config: ModelConfig, max_sessions: int, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.layout = CacheLayout(config)
        d = config.dit
        kv_shape = (max_sessions, config.cache_capacity_tokens, d.num_heads, d.head_dim)
        cross_shape = (max_sessions, d.text_len, d.num_heads, d.head_dim)
        self.k_pools = [torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        self.v_pools = [torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        self.cross_k = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        self.cross_v = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        s = config.stream
        segments = config.sink_chunks + config.window_chunks
        latent_shape = (max_sessions, segments, d.in_dim, s.frames_per_chunk, s.latent_height, s.latent_width)
        self.latents = torch.zeros(latent_shape, device=device, dtype=dtype)
        self.fences = ImportFences(d.num_layers, device)

    def write_index(self, slots: list[int], chunk_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, row) index tensors [B * chunk_tokens] addressing where each session's chunk K/V goes."""
        tokens = self.config.chunk_tokens
        device = self.k_pools[0].device
        slot_index = torch.tensor(slots, dtype=torch.long).repeat_interleave(tokens)
        starts = torch.tensor([self.layout.first_row(c) for c in chunk_indices], dtype=torch.long)
        row_index = (starts[:, None] + torch.arange(tokens)).reshape(-1)
        return slot_index.to(device), row_index.to(device)

    def export_kv(self, slot: int, rows: int) -> torch.Tensor:
        """Rows [0, rows) of every layer's K and V as one contiguous [layers, 2, rows, heads, head_dim] tensor."""
        d = self.config.dit
        shape = (d.num_layers, 2, rows, d.num_heads, d.head_dim)
        out = torch.empty(shape, device=self.k_pools[0].device, dtype=self.k_pools[0].dtype)
        kernels.pack_kv(self.k_pools, self.v_pools, slot, rows, out.view(-1))
        return out

    def store_latents(self, slots: list[int], chunk_indices: list[int], latents: torch.Tensor) -> None:
        """Keep each session's clean chunk [B, C, F, h, w] in the segment its K/V occupies."""
        slot_index = torch.tensor(slots, dtype=torch.long, device=self.latents.device)
        segments = torch.tensor([self.layout.segment(c) for c in chunk_indices], dtype=torch.long,
                                device=self.latents.device)
        self.latents.index_put_((slot_index, segments), latents.to(self.latents.dtype))

    def move_ring_rows(self, slot: int, moves: list[tuple[int, int]]) -> None:
        """Copy each (from_row, to_row) chunk-sized block of ``slot``'s K and V, all read before any is written."""
        tokens = self.config.chunk_tokens
        device = self.k_pools[0].device
        source = torch.tensor([r + i for r, _ in moves for i in range(tokens)], dtype=torch.long, device=device)
        target = torch.tensor([r + i for _, r in moves for i in range(tokens)], dtype=torch.long, device=device)
        for pool in (*self.k_pools, *self.v_pools):
            pool[slot].index_copy_(0, target, pool[slot].index_select(0, source))

    def export_cross(self, slot: int) -> torch.Tensor:
        """The slot's prompt K/V as [layers, 2, text_len, heads, head_dim]."""
        return torch.stack([torch.stack([k[slot], v[slot]]) for k, v in zip(self.cross_k, self.cross_v, strict=True)])

    def import_slot(self, slot: int, kv: torch.Tensor, cross_kv: torch.Tensor, latents: torch.Tensor,
                    also: Sequence[tuple[torch.Tensor, torch.Tensor]], copier: StreamCopier) -> CopyTicket:
        """Copy an exported session into ``slot`` from any device: prompt K/V first, then the cache one layer at a
        time, then the latents and the ``also`` (destination, source) pairs. Returns once the copies are issued
        (on CUDA) and fences each part, so the next batch waits on the GPU for exactly what it is about to read.
        The ticket returned lands with the last copy and keeps every source alive until then."""
        rows = kv.shape[2]
        groups = [[(self.cross_k[layer][slot], cross_kv[layer, 0]) for layer in range(len(self.cross_k))]
                  + [(self.cross_v[layer][slot], cross_kv[layer, 1]) for layer in range(len(self.cross_v))]]
        groups += [[(k[slot, :rows], kv[layer, 0]), (v[slot, :rows], kv[layer, 1])]
                   for layer, (k, v) in enumerate(zip(self.k_pools, self.v_pools, strict=True))]
        groups.append([(self.latents[slot, : latents.shape[0]], latents), *also])
        tickets = copier.copy_in_order(groups)
        self.fences.add(tickets[0], tickets[1:-1], tickets[-1])
        return tickets[-1]


class ImportFences:
    """Copies into the pools still in flight after ``import_slot``, by what must wait for them: the batch's gather
    of prompt K/V (``before_batch``), each layer's self-attention (``before_layer``), the latents and anything else
    that touches a whole slot (``before_all``). A wait puts the compute stream behind the copy on the GPU and
    blocks no thread, so a restored session's first chunk starts while its later layers still copy; off CUDA the
    copies have finished before ``import_slot`` returns and every wait is a no-op."""

    def __init__(self, layers: int, device: torch.device) -> None:
        self._device = device
        self._batch: list[CopyTicket] = []
        self._layers: list[list[CopyTicket]] = [[] for _ in range(layers)]
        self._rest: list[CopyTicket] = []

    def add(self, batch: CopyTicket, layers: Sequence[CopyTicket], rest: CopyTicket) -> None:
        self._batch.append(batch)
        for pending, ticket in zip(self._layers, layers, strict=True):
            pending.append(ticket)
        self._rest.append(rest)

    def before_batch(self) -> None:
        self._order(self._batch)

    def before_layer(self, layer: int) -> None:
        self._order(self._layers[layer])

    def before_all(self) -> None:
        """Every pending copy: the last one of each import lands after all of its others (one side stream)."""
        self._order(self._rest)
        self._batch.clear()
        for pending in self._layers:
            pending.clear()

    def _order(self, tickets: list[CopyTicket]) -> None:
        if not tickets:  # the common case, once per layer per step: no import in flight
            return
        stream = torch.cuda.current_stream(self._device) if self._device.type == "cuda" else None
        for ticket in tickets:
            ticket.order_before(stream)
        tickets.clear()
