"""Benchmark of the chunk-path Triton kernels against their torch references at Wan2.1-1.3B's shapes (LongLive).

Run: ``.venv/bin/python -m bench.kernels`` on a CUDA machine (about a minute). Writes bench/results/kernels.json.
Without a GPU it says so, writes a JSON marked skipped with the reason, and exits 0.

Definitions. Times are CUDA-event means from ``triton.testing.do_bench`` (L2 flushed between runs). One call
is one layer's worth of the op. Speedup = reference time / kernel time. Attention reports useful TFLOP/s
(4 * L * (cache_len + L) * head_dim * heads per session: no padding counted). The bandwidth-bound ops report
achieved DRAM bandwidth = bytes an ideal kernel must move (each input read once, each output written once)
/ kernel time, and its fraction of the device's peak (memory clock x bus width, from the driver). Attention
runs two cache mixes per batch: every session at a full cache (1 sink + 3 window chunks = 18,720 rows) and
a mixed batch (1, 2, 3, 4 chunks cached, repeating), which is where padding to the longest cache costs the
reference. Pack moves one session's whole 30-layer cache, so it does not depend on the batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from services.gpu_worker.kernels import reference
from services.gpu_worker.kernels.selection import interpreter_enabled
from services.gpu_worker.model.config import ModelConfig, get_config

RESULTS = Path(__file__).parent / "results" / "kernels.json"
MODEL = "longlive"
BATCHES = (1, 4, 8)
DTYPE = torch.bfloat16
GB = 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console()
    reason = _why_not_runnable()
    if reason is not None:
        console.print(f"bench/kernels.py needs a CUDA GPU with triton: {reason}. Skipped.")
        _write(args.out, {"skipped": True, "reason": reason, "created": _now()})
        return 0

    from triton.testing import get_dram_gbps

    config = get_config(MODEL)
    peak_gbps = get_dram_gbps()
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        for mix in ("full", "mixed"):
            rows.append(bench_attention(config, batch, mix))
        rows.append(bench_norm_modulate(config, batch, peak_gbps))
        rows.append(bench_rope(config, batch, peak_gbps))
    rows.extend(bench_pack(config, peak_gbps))
    _print_table(console, rows, peak_gbps)
    _write(args.out, {
        "skipped": False, "created": _now(), "device": torch.cuda.get_device_name(), "peak_dram_gbps": peak_gbps,
        "torch": torch.__version__, "triton": _triton_version(), "model": MODEL, "dtype": str(DTYPE),
        "results": rows,
    })
    return 0


def bench_attention(config: ModelConfig, batch: int, mix: str) -> dict[str, Any]:
    from services.gpu_worker.kernels import triton_attention

    chunk, capacity = config.chunk_tokens, config.cache_capacity_tokens
    if mix == "full":
        cache_lens = [capacity] * batch
    else:
        cache_lens = [min(capacity, chunk * (1 + index % 4)) for index in range(batch)]
    shape = (batch, chunk, config.dit.num_heads, config.dit.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(3))
    pool_shape = (batch, capacity, config.dit.num_heads, config.dit.head_dim)
    k_pool, v_pool = (torch.randn(pool_shape, device="cuda", dtype=DTYPE) for _ in range(2))
    slots = torch.arange(batch, device="cuda").flip(0)
    lens = torch.tensor(cache_lens, device="cuda")
    args = (q, k, v, k_pool, v_pool, slots, lens)
    flops = sum(4 * chunk * (n + chunk) * config.dit.head_dim * config.dit.num_heads for n in cache_lens)
    row = _compare(f"varlen_attention[{mix}]", batch, lambda: reference.varlen_attention(*args),
                   lambda: triton_attention.varlen_attention(*args))
    row["kernel_tflops"] = flops / (row["kernel_ms"] * 1e-3) / 1e12
    row["cache_lens"] = cache_lens
    return row


def bench_norm_modulate(config: ModelConfig, batch: int, peak_gbps: float) -> dict[str, Any]:
    from services.gpu_worker.kernels import triton_norm

    x = torch.randn(batch, config.chunk_tokens, config.dit.dim, device="cuda", dtype=DTYPE)
    shift, scale = (torch.randn(batch, config.dit.dim, device="cuda", dtype=DTYPE) for _ in range(2))
    moved_bytes = 2 * x.numel() * x.element_size() + 2 * shift.numel() * shift.element_size()
    row = _compare("norm_modulate", batch, lambda: reference.norm_modulate(x, shift, scale),
                   lambda: triton_norm.norm_modulate(x, shift, scale))
    return _with_bandwidth(row, moved_bytes, peak_gbps)


def bench_rope(config: ModelConfig, batch: int, peak_gbps: float) -> dict[str, Any]:
    from services.gpu_worker.kernels import triton_rope

    tokens = batch * config.chunk_tokens
    x = torch.randn(tokens, config.dit.num_heads, config.dit.head_dim, device="cuda", dtype=DTYPE)
    angles = torch.rand(tokens, config.dit.head_dim // 2, device="cuda") * 6.3
    cos, sin = angles.cos(), angles.sin()
    moved_bytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
    row = _compare("rope_", batch, lambda: reference.rope_(x, cos, sin), lambda: triton_rope.rope_(x, cos, sin))
    return _with_bandwidth(row, moved_bytes, peak_gbps)


def bench_pack(config: ModelConfig, peak_gbps: float) -> list[dict[str, Any]]:
    from services.gpu_worker.kernels import triton_pack

    n_tokens = config.cache_capacity_tokens
    pool_shape = (2, n_tokens, config.dit.num_heads, config.dit.head_dim)
    k_pools = [torch.randn(pool_shape, device="cuda", dtype=DTYPE) for _ in range(config.dit.num_layers)]
    v_pools = [torch.randn(pool_shape, device="cuda", dtype=DTYPE) for _ in range(config.dit.num_layers)]
    buf = torch.empty(2 * config.dit.num_layers * n_tokens * config.dit.dim, device="cuda", dtype=DTYPE)
    moved_bytes = 2 * buf.numel() * buf.element_size()
    pack = _compare("pack_kv", 1, lambda: reference.pack_kv(k_pools, v_pools, 1, n_tokens, buf),
                    lambda: triton_pack.pack_kv(k_pools, v_pools, 1, n_tokens, buf))
    return [_with_bandwidth(pack, moved_bytes, peak_gbps)]


def _compare(op: str, batch: int, run_reference: Callable[[], torch.Tensor | None],
             run_kernel: Callable[[], torch.Tensor | None]) -> dict[str, Any]:
    """Times both, and records the largest difference of their outputs as a sanity check of the run."""
    from triton.testing import do_bench

    expected, actual = run_reference(), run_kernel()
    max_abs_diff = 0.0
    if actual is not None and expected is not None:
        max_abs_diff = float((actual.float() - expected.float()).abs().max())
    reference_ms, kernel_ms = do_bench(run_reference), do_bench(run_kernel)
    return {"op": op, "batch": batch, "reference_ms": reference_ms, "kernel_ms": kernel_ms,
            "speedup": reference_ms / kernel_ms, "max_abs_diff": max_abs_diff}


def _with_bandwidth(row: dict[str, Any], moved_bytes: int, peak_gbps: float) -> dict[str, Any]:
    row["moved_gb"] = moved_bytes / GB
    row["kernel_gbps"] = moved_bytes / GB / (row["kernel_ms"] * 1e-3)
    row["reference_gbps"] = moved_bytes / GB / (row["reference_ms"] * 1e-3)
    row["kernel_fraction_of_peak"] = row["kernel_gbps"] / peak_gbps
    return row


def _print_table(console: Console, rows: list[dict[str, Any]], peak_gbps: float) -> None:
    table = Table(title=f"{MODEL} kernels on {torch.cuda.get_device_name()} (peak DRAM {peak_gbps:,.0f} GB/s)")
    for column in ("op", "batch", "reference ms", "kernel ms", "speedup", "TFLOP/s", "GB/s", "of peak"):
        table.add_column(column, justify="left" if column == "op" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["op"], str(row["batch"]), f"{row['reference_ms']:.3f}", f"{row['kernel_ms']:.3f}",
            f"{row['speedup']:.2f}x", f"{row['kernel_tflops']:.0f}" if "kernel_tflops" in row else "",
            f"{row['kernel_gbps']:,.0f}" if "kernel_gbps" in row else "",
            f"{row['kernel_fraction_of_peak']:.0%}" if "kernel_fraction_of_peak" in row else "",
        )
    console.print(table)


def _why_not_runnable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if interpreter_enabled():
        return "TRITON_INTERPRET=1 would run the kernels on the host; unset it"
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton does not import ({error})"
    return None


def _triton_version() -> str:
    import triton

    return triton.__version__


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    raise SystemExit(main())
