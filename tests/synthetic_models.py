"""One synthetic ``tiny`` model directory per test process, written by the real synth in the published layouts
and read by the real loader, shared by every test that needs a model (unit, integration and e2e workers)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from services.gpu_worker.model import WanStreamingModel
from services.gpu_worker.model.loader import ModelParts, load_parts
from services.gpu_worker.model.synth import temporary_synthetic_dir


def tiny_model_dir() -> Path:
    return temporary_synthetic_dir("tiny")


@functools.cache
def _tiny_parts() -> ModelParts:
    return load_parts(tiny_model_dir(), "tiny")


def load_tiny(max_sessions: int | None = None) -> WanStreamingModel:
    """A fresh model (its own slots and caches) over the tiny networks, which are read once and shared: they are
    never written to, and the loader itself is tested on its own."""
    parts = _tiny_parts()
    slots = parts.config.default_max_sessions if max_sessions is None else max_sessions
    return WanStreamingModel(parts.config, parts.dit, parts.vae, parts.text, torch.device("cpu"), torch.float32, slots)
