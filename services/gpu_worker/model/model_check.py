"""``turboserve model check DIR``: can this directory be served, and how many sessions fit on a GPU?

Runs without a GPU and without loading weights: the networks are built on the meta device, the checkpoints are
memory-mapped, and only their key sets, shapes and dtypes are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.gpu_worker.model import checkpoint_files as files
from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.errors import CheckpointError, UnknownModelConfig
from services.gpu_worker.model.loader import (
    compare_keys,
    generator_state,
    load_tokenizer,
    on_meta,
    text_encoder_state,
    vae_state,
)
from services.gpu_worker.model.vae import vae_cache_bytes

_GIB = 1 << 30


def _size(count: int) -> str:
    for unit, scale in (("GiB", _GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


@dataclass(frozen=True, slots=True)
class FileCheck:
    what: str
    path: str
    problem: str | None


@dataclass(frozen=True, slots=True)
class ModelSizes:
    """Bytes a config needs on a device, from its architecture alone (meta device)."""

    kv_bytes: int
    vae_cache_bytes: int
    weight_bytes: int
    """DiT + VAE + text encoder."""
    text_encoder_bytes: int

    @classmethod
    def of(cls, config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
        dit, vae, encoder = on_meta(config)
        element = torch.finfo(dtype).bits // 8
        vae_cache = vae_cache_bytes(config, element)

        def size(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters()) * element

        text = size(encoder)
        return cls(config.kv_bytes(element), vae_cache, size(dit) + size(vae) + text, text)

    @property
    def session_bytes(self) -> int:
        return self.kv_bytes + self.vae_cache_bytes

    def sessions_fitting(self, gpu_bytes: int, text_on_gpu: bool = True) -> int:
        """Sessions whose state fits beside the weights; activations of a batch are not counted."""
        weights = self.weight_bytes - (0 if text_on_gpu else self.text_encoder_bytes)
        return max(0, (gpu_bytes - weights) // self.session_bytes)


@dataclass(frozen=True, slots=True)
class CheckReport:
    config: ModelConfig
    files: list[FileCheck]
    sizes: ModelSizes

    @property
    def ok(self) -> bool:
        return all(check.problem is None for check in self.files)


def _check(what: str, step: Callable[[], str]) -> FileCheck:
    try:
        return FileCheck(what, step(), None)
    except CheckpointError as exc:
        return FileCheck(what, "", str(exc))


def check_directory(model_dir: str | Path, config_name: str | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> CheckReport:
    """Compare every file of ``model_dir`` against the architecture; raises only for an unusable directory."""
    model_dir = Path(model_dir)
    config = files.resolve_config(model_dir, config_name)
    dit, vae, encoder = on_meta(config)

    def against(module: torch.nn.Module, load: Callable[[], tuple[Path, dict[str, torch.Tensor]]]) -> str:
        path, state = load()
        compare_keys(path, module.state_dict(), state)
        return str(path)

    checks = [
        _check("generator", lambda: against(dit, lambda: generator_state(model_dir, config))),
        _check("VAE", lambda: against(vae, lambda: vae_state(model_dir))),
        _check("text encoder", lambda: against(encoder, lambda: text_encoder_state(model_dir))),
        _check("tokenizer", lambda: f"{load_tokenizer(model_dir).name_or_path}"),
    ]
    return CheckReport(config, checks, ModelSizes.of(config, dtype))


def print_report(report: CheckReport, gpu_memory_gib: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"model config {report.config.name!r}: {report.config.about}", title_justify="left")
    table.add_column("part")
    table.add_column("file")
    table.add_column("status")
    for check in report.files:
        table.add_row(check.what, check.path, "[green]ok[/]" if check.problem is None else "[red]error[/]")
    console.print(table)
    for check in report.files:
        if check.problem is not None:
            console.print(f"[red]{check.what}:[/] {check.problem}", soft_wrap=True)
    gpu_bytes = int(gpu_memory_gib * _GIB)
    sizes = report.sizes
    console.print(f"one session's state: {_size(sizes.session_bytes)} (KV {_size(sizes.kv_bytes)} + VAE cache "
                  f"{_size(sizes.vae_cache_bytes)}), bf16")
    console.print(f"weights: {_size(sizes.weight_bytes)}, of which the text encoder {_size(sizes.text_encoder_bytes)}")
    console.print(f"sessions in {gpu_memory_gib:g} GiB before activations: "
                  f"{sizes.sessions_fitting(gpu_bytes)} with the text encoder on the GPU, "
                  f"{sizes.sessions_fitting(gpu_bytes, text_on_gpu=False)} with it elsewhere "
                  "(TURBOSERVE_TEXT_DEVICE)")


def run_check(model_dir: str, config_name: str | None, gpu_memory_gib: float) -> int:
    try:
        report = check_directory(model_dir, config_name)
    except (CheckpointError, UnknownModelConfig) as exc:
        print(f"turboserve model check: {exc}")
        return 2
    print_report(report, gpu_memory_gib)
    return 0 if report.ok else 2
