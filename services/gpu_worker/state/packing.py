"""Named state tensors <-> a few contiguous buffers plus a manifest of named views, so a move is a few big copies.

Layout rule: a tensor of at least ``own_buffer_min_bytes`` gets a buffer of its own (it is already one large
copy, and sending it needs no packing copy at all); smaller tensors share one packed buffer per dtype, each view
aligned to ``ALIGN_BYTES``. Offsets and sizes are in elements of the buffer's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.gpu_worker.state.errors import ManifestError

ALIGN_BYTES = 256
DEFAULT_OWN_BUFFER_MIN_BYTES = 1 << 20
MAX_VIEWS = 4096

DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NAMES_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES_BY_NAME.items()}


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """One contiguous 1-D buffer of ``numel`` elements of ``dtype``."""

    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class TensorView:
    """Where one named tensor lives: ``buffers[buffer][offset : offset + numel]`` viewed as ``shape``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: int
    offset: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True, slots=True)
class StateManifest:
    """The layout of a packed state; travels beside the buffers (never inside them) and is checked on decode."""

    views: tuple[TensorView, ...]
    buffers: tuple[BufferSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.buffers)

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack/JSON-able form."""
        return {
            "buffers": [[NAMES_BY_DTYPE[spec.dtype], spec.numel] for spec in self.buffers],
            "views": [[v.name, NAMES_BY_DTYPE[v.dtype], list(v.shape), v.buffer, v.offset] for v in self.views],
        }

    @classmethod
    def from_wire(cls, wire: object) -> StateManifest:
        """Decode and validate: every view must fit inside a buffer of its own dtype, names must be unique."""
        if not isinstance(wire, Mapping) or not isinstance(wire.get("buffers"), list) or not isinstance(
            wire.get("views"), list
        ):
            raise ManifestError(f"manifest must map 'buffers' and 'views' to lists, got {wire!r:.200}")
        if len(wire["views"]) > MAX_VIEWS:
            raise ManifestError(f"manifest has {len(wire['views'])} views, more than {MAX_VIEWS}")
        try:
            buffers = tuple(BufferSpec(_dtype(name), _count(numel)) for name, numel in wire["buffers"])
            views = tuple(
                TensorView(_name(name), _dtype(dtype), tuple(_count(size) for size in shape), _count(buf), _count(off))
                for name, dtype, shape, buf, off in wire["views"]
            )
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest entry: {exc}") from exc
        manifest = cls(views, buffers)
        manifest.check()
        return manifest

    def check(self) -> None:
        """Raise ManifestError unless every view lies inside a buffer of its dtype and names are unique."""
        names = [view.name for view in self.views]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate tensor names in manifest: {sorted(names)}")
        for view in self.views:
            if not 0 <= view.buffer < len(self.buffers):
                raise ManifestError(f"view {view.name!r} names buffer {view.buffer} of {len(self.buffers)}")
            spec = self.buffers[view.buffer]
            if spec.dtype != view.dtype or view.offset + view.numel > spec.numel:
                raise ManifestError(
                    f"view {view.name!r} ({view.dtype}, {view.offset}+{view.numel}) does not fit buffer "
                    f"{view.buffer} ({spec.dtype}, {spec.numel})"
                )

    def own_buffer_names(self) -> dict[int, str]:
        """Buffers that hold exactly one whole tensor, by buffer index: those can be sent without packing."""
        owners: dict[int, list[TensorView]] = {}
        for view in self.views:
            owners.setdefault(view.buffer, []).append(view)
        return {
            index: members[0].name
            for index, members in owners.items()
            if len(members) == 1 and members[0].offset == 0 and members[0].numel == self.buffers[index].numel
        }


def plan_manifest(
    tensors: Mapping[str, torch.Tensor], *, own_buffer_min_bytes: int = DEFAULT_OWN_BUFFER_MIN_BYTES
) -> StateManifest:
    """Lay out named tensors: large ones alone, small ones packed per dtype, in the order given."""
    if own_buffer_min_bytes < 1:
        raise ValueError(f"own_buffer_min_bytes must be >= 1, got {own_buffer_min_bytes}")
    buffers: list[BufferSpec] = []
    views: list[TensorView] = []
    packed_numel: dict[torch.dtype, int] = {}  # per dtype, in first-seen order
    for name, tensor in tensors.items():
        if tensor.dtype not in NAMES_BY_DTYPE:
            raise ManifestError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        shape = tuple(tensor.shape)
        if tensor.numel() * tensor.element_size() >= own_buffer_min_bytes:
            views.append(TensorView(name, tensor.dtype, shape, len(buffers), 0))
            buffers.append(BufferSpec(tensor.dtype, tensor.numel()))
            continue
        align = max(1, ALIGN_BYTES // tensor.element_size())
        offset = -(-packed_numel.get(tensor.dtype, 0) // align) * align
        views.append(TensorView(name, tensor.dtype, shape, -1, offset))  # its buffer index is known below
        packed_numel[tensor.dtype] = offset + tensor.numel()
    packed_index: dict[torch.dtype, int] = {}
    for dtype, numel in packed_numel.items():
        packed_index[dtype] = len(buffers)
        buffers.append(BufferSpec(dtype, numel))
    placed = tuple(
        view if view.buffer >= 0 else dataclasses.replace(view, buffer=packed_index[view.dtype]) for view in views
    )
    return StateManifest(placed, tuple(buffers))


def unpack(manifest: StateManifest, buffers: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named zero-copy views into ``buffers``; they alias the buffers, so they live only as long as those do."""
    _check_buffers(manifest, buffers)
    return {
        view.name: buffers[view.buffer].narrow(0, view.offset, view.numel).view(view.shape)
        for view in manifest.views
    }


def copy_pairs(
    manifest: StateManifest, tensors: Mapping[str, torch.Tensor], buffers: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view, source tensor) for every named tensor: what a copier must copy to pack ``tensors``."""
    if set(tensors) != {view.name for view in manifest.views}:
        raise ManifestError(f"tensors {sorted(tensors)} do not match manifest {[v.name for v in manifest.views]}")
    destinations = unpack(manifest, buffers)
    pairs = []
    for name, destination in destinations.items():
        source = tensors[name]
        if source.dtype != destination.dtype or source.shape != destination.shape:
            raise ManifestError(
                f"tensor {name!r} is {source.dtype}{list(source.shape)}, manifest says "
                f"{destination.dtype}{list(destination.shape)}"
            )
        pairs.append((destination, source))
    return pairs


def pack_for_send(manifest: StateManifest, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Buffers on the tensors' device; a contiguous tensor alone in its buffer is sent as-is, without a copy."""
    solo = manifest.own_buffer_names()
    buffers: list[torch.Tensor] = []
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    for index, spec in enumerate(manifest.buffers):
        owner_name = solo.get(index)
        owner = tensors.get(owner_name) if owner_name is not None else None
        if owner is not None and owner.is_contiguous() and owner.dtype == spec.dtype:
            buffers.append(owner.view(-1))
        else:
            buffers.append(torch.empty(spec.numel, dtype=spec.dtype, device=device))
    for destination, source in copy_pairs(manifest, tensors, buffers):
        if destination.data_ptr() != source.data_ptr():
            destination.copy_(source)
    return buffers


def _check_buffers(manifest: StateManifest, buffers: Sequence[torch.Tensor]) -> None:
    if len(buffers) != len(manifest.buffers):
        raise ManifestError(f"{len(buffers)} buffers given, manifest has {len(manifest.buffers)}")
    for index, (buffer, spec) in enumerate(zip(buffers, manifest.buffers, strict=True)):
        if buffer.dim() != 1 or buffer.dtype != spec.dtype or buffer.numel() < spec.numel:
            raise ManifestError(
                f"buffer {index} is {buffer.dtype}{list(buffer.shape)}, manifest needs {spec.dtype}[{spec.numel}]"
            )


def _dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES_BY_NAME:
        raise ManifestError(f"unsupported dtype {name!r}; known: {sorted(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[name]


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"tensor names must be non-empty strings, got {value!r}")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"expected a non-negative integer, got {value!r}")
    return value
