"""The model's own speed and size: chunk latency batched vs one session at a time, split by stage, and the bytes of
one session's state.

Run: ``.venv/bin/python bench/model.py`` (CPU: about a minute). On CUDA it builds the full-size Wan2.1-1.3B causal
model at 832x480 with synthetic bf16 weights on the GPU (nothing to download); elsewhere the ``tiny`` config read
from a synthetic model directory by the real loader, and the GPU figures stay unmeasured. Writes
``bench/results/model.json`` and ``bench/results/model_stages.png``.

It also restores one session's state from host memory beside three others: the copy alone, and the first batch
after it while the copies stream in layer by layer, against the steady batch; and it sets that against what the
scheduler's ``RestoreCostModel`` predicts from the measured copy and first-pass share.

Stages (each ends at a device sync, so the split adds up to the chunk): ``dit_step_N`` one batched denoising step,
``cache_write`` the forward that stores the clean chunk's K/V, ``vae_decode`` the causal VAE with each session's
feature cache, and, outside the model, ``jpeg`` (the worker's encoder) and ``text_encode`` (one uncached prompt).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from services.gpu_worker.frames import JpegEncoder  # noqa: E402
from services.gpu_worker.model import WanStreamingModel, get_config, load_model  # noqa: E402
from services.gpu_worker.model.model_check import ModelSizes  # noqa: E402
from services.gpu_worker.model.synth import synthetic_model_on_device, temporary_synthetic_dir  # noqa: E402
from services.scheduler.policy.cost_models import RestoreCostModel, TransferCostModel  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 2, 4, 8)
RESTORE_BATCH = 4
GPU_GIB = 80


class StageClock:
    """Collects the time of each stage of one ``generate``, syncing the device at every mark."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.stages: dict[str, float] = {}
        self._last = 0.0

    def sync(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def start(self) -> None:
        self.stages = {}
        self._last = self.sync()

    def mark(self, stage: str) -> None:
        now = self.sync()
        self.stages[stage] = (now - self._last) * 1e3
        self._last = now


def measure(model: WanStreamingModel, batch: int, repeats: int, clock: StageClock,
            jpeg: JpegEncoder) -> dict[str, Any]:
    handles = [model.new_session(f"b{batch}-{i}", f"benchmark stream {batch} {i}", i) for i in range(batch)]
    for _ in range(2):  # past the 9-frame first chunk and the cache's first fill
        model.generate(handles)
    chunk_ms, alone_ms, stages, jpeg_ms = [], [], [], []
    for _ in range(repeats):
        clock.start()
        outputs = model.generate(handles)
        chunk_ms.append(sum(clock.stages.values()))
        stages.append(dict(clock.stages))
        started = time.perf_counter()
        for output in outputs:
            jpeg.encode_frames(output.frames)
        jpeg_ms.append((time.perf_counter() - started) * 1e3)
        started = clock.sync()
        for handle in handles:
            model.generate([handle])
        alone_ms.append((clock.sync() - started) * 1e3)
    for handle in handles:
        model.release(handle)
    median_stages = {name: statistics.median(s[name] for s in stages) for name in stages[0]}
    return {"batch": batch, "chunk_ms": statistics.median(chunk_ms), "one_by_one_ms": statistics.median(alone_ms),
            "stages_ms": median_stages, "jpeg_ms": statistics.median(jpeg_ms)}


def measure_restore(model: WanStreamingModel, batch: int, repeats: int, clock: StageClock) -> dict[str, float]:
    """A session's state exported to (pinned) host memory and imported again, timed two ways: the copy alone
    (import until its copies land), and the first batch after it, with the copies streaming in under that batch,
    against the same batch in steady state."""
    handles = [model.new_session(f"r{i}", f"restore stream {i}", i) for i in range(batch)]
    for _ in range(2):
        model.generate(handles)
    pin = torch.cuda.is_available()
    copy_ms, steady_ms, first_ms = [], [], []
    state_bytes = 0
    for repeat in range(2 * repeats):
        exported = model.export_state(handles[-1])
        host = {name: t.to("cpu").pin_memory() if pin else t.to("cpu", copy=True) for name, t in exported.items()}
        state_bytes = sum(t.nbytes for t in host.values())
        model.release(handles[-1])
        started = clock.sync()
        handles[-1] = model.import_state(handles[-1].session_id, host)
        if repeat % 2 == 0:  # the copy alone
            model.import_landed(handles[-1]).wait()
            copy_ms.append((clock.sync() - started) * 1e3)
            model.generate(handles)
        else:  # streamed under the next batch
            model.generate(handles)
            first_ms.append((clock.sync() - started) * 1e3)
        started = clock.sync()
        model.generate(handles)
        steady_ms.append((clock.sync() - started) * 1e3)
    for handle in handles:
        model.release(handle)
    steady = statistics.median(steady_ms)
    return {"batch": batch, "state_bytes": state_bytes, "copy_ms": statistics.median(copy_ms),
            "steady_chunk_ms": steady, "first_chunk_ms": statistics.median(first_ms),
            "first_chunk_extra_ms": statistics.median(first_ms) - steady}


def text_encode_ms(model: WanStreamingModel, clock: StageClock, prompts: int = 5) -> float:
    samples = []
    for i in range(prompts):
        started = clock.sync()
        model.text.encode(f"an uncached prompt number {i} about a fox in the snow")
        samples.append((clock.sync() - started) * 1e3)
    return statistics.median(samples)


def by_stage_share(rows: list[dict[str, Any]], batch: int, stage: str) -> float:
    row = next(r for r in rows if r["batch"] == batch)
    return float(row["stages_ms"][stage] / row["chunk_ms"])


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*rows[0]["stages_ms"], "jpeg"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(rows)
    for name in names:
        values = [r["stages_ms"].get(name, r["jpeg_ms"] if name == "jpeg" else 0.0) / r["batch"] for r in rows]
        ax.bar([str(r["batch"]) for r in rows], values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    alone = [r["one_by_one_ms"] / r["batch"] for r in rows]
    ax.plot([str(r["batch"]) for r in rows], alone, "k--o", label="one at a time (per session)")
    ax.set_xlabel("sessions in the batch")
    ax.set_ylabel("ms per session-chunk")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="default: self-forcing on CUDA, tiny elsewhere")
    parser.add_argument("--repeats", type=int, default=None, help="measured chunks per batch size")
    parser.add_argument("--out", type=Path, default=RESULTS / "model.json")
    args = parser.parse_args()
    console = Console(width=150)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = args.config or ("self-forcing" if cuda else "tiny")
    repeats = args.repeats or (10 if cuda else 6)
    if cuda:
        dtype = torch.bfloat16
        model = synthetic_model_on_device(get_config(name), device, dtype, max(BATCHES))
        device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(1)  # as the worker runs on CPU
        dtype = torch.float32
        model = load_model(temporary_synthetic_dir(name), name, max_sessions=max(BATCHES))
        device_name = "cpu (1 thread)"
    config = model.config
    clock = StageClock(device)
    model.stage_mark = clock.mark
    jpeg = JpegEncoder(85)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{name} on {device_name}", total=len(BATCHES))
        for batch in BATCHES:
            rows.append(measure(model, batch, repeats, clock, jpeg))
            progress.advance(task)
    text_ms = text_encode_ms(model, clock)
    model.stage_mark = lambda _: None  # no syncs inside the chunk while a restore overlaps it
    restore = measure_restore(model, RESTORE_BATCH, repeats, clock)
    first_pass_share = by_stage_share(rows, RESTORE_BATCH, "dit_step_0")
    predicted = RestoreCostModel(
        TransferCostModel(0.0, restore["state_bytes"] / restore["copy_ms"] / 1e6), config.dit.num_layers,
        first_pass_share).delay_ms(int(restore["state_bytes"]), restore["steady_chunk_ms"])
    full = get_config("self-forcing")
    full_sizes = ModelSizes.of(full, torch.bfloat16)
    measured_sizes = model.state_bytes()
    by_batch = {r["batch"]: r for r in rows}
    speedup_8 = by_batch[8]["one_by_one_ms"] / by_batch[8]["chunk_ms"]
    frames_per_chunk = config.video_frames(1)

    table = Table(title=f"{name} on {device_name}, {str(dtype).removeprefix('torch.')}, median of {repeats}")
    stage_columns = [f"{stage.replace('dit_', '').replace('_', ' ')} ms" for stage in rows[0]["stages_ms"]]
    for column in ("batch", "chunk ms", "one-by-one ms", "speedup", "frames/s", *stage_columns, "jpeg ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['chunk_ms']:.1f}", f"{r['one_by_one_ms']:.1f}",
                      f"{r['one_by_one_ms'] / r['chunk_ms']:.2f}x",
                      f"{r['batch'] * frames_per_chunk / r['chunk_ms'] * 1e3:.1f}",
                      *(f"{v:.1f}" for v in r["stages_ms"].values()), f"{r['jpeg_ms']:.1f}")
    console.print(table)
    console.print(f"text encode (one uncached prompt): {text_ms:.1f} ms")
    console.print(f"state per session, {name} as run: KV {measured_sizes.kv / 2**20:.2f} MiB, VAE cache "
                  f"{measured_sizes.vae / 2**20:.2f} MiB")
    console.print(f"state per session, Wan2.1-1.3B at 832x480 in bf16 (from the architecture): KV "
                  f"{full_sizes.kv_bytes / 2**30:.2f} GiB, VAE cache {full_sizes.vae_cache_bytes / 2**30:.2f} GiB; "
                  f"{full_sizes.sessions_fitting(GPU_GIB * 2**30)} sessions in {GPU_GIB} GiB")
    console.print(f"restore of one session's state ({restore['state_bytes'] / 2**20:.1f} MiB) from host memory "
                  f"beside {RESTORE_BATCH - 1} others: copy alone {restore['copy_ms']:.1f} ms; the first batch after "
                  f"it {restore['first_chunk_ms']:.1f} ms against {restore['steady_chunk_ms']:.1f} ms steady, "
                  f"+{restore['first_chunk_extra_ms']:.1f} ms (the scheduler's model, first DiT pass "
                  f"{first_pass_share:.0%} of a chunk, predicts +{predicted:.1f} ms)")
    if not cuda:
        console.print("[yellow]GPU figures unmeasured: no CUDA device here (run this script on one).[/]")

    payload = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name, "config": name, "dtype": str(dtype).removeprefix("torch."),
        "gpu_measured": cuda,
        "chunk_ms": {str(r["batch"]): r["chunk_ms"] for r in rows},
        "one_by_one_ms": {str(r["batch"]): r["one_by_one_ms"] for r in rows},
        "coalesced_speedup_8": speedup_8,
        "frames_per_s_batch_1": frames_per_chunk / by_batch[1]["chunk_ms"] * 1e3,
        "stages_ms": {str(r["batch"]): {**r["stages_ms"], "jpeg": r["jpeg_ms"]} for r in rows},
        "text_encode_ms": text_ms,
        "restore": {**restore, "first_pass_share": first_pass_share, "predicted_extra_ms": predicted},
        "state_bytes_kv": full_sizes.kv_bytes, "state_bytes_vae": full_sizes.vae_cache_bytes,
        "state_bytes_of": "self-forcing at 832x480, bf16, full attention window",
        "sessions_per_80gb": full_sizes.sessions_fitting(GPU_GIB * 2**30),
        "measured_state_bytes": {"config": name, "kv": measured_sizes.kv, "vae": measured_sizes.vae},
        "weights_bytes": full_sizes.weight_bytes, "text_encoder_bytes": full_sizes.text_encoder_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(rows, f"{name} chunk time per session by stage, {device_name}", args.out.with_name("model_stages.png"))
    console.print(f"wrote {args.out}")
    return 0 if all(math.isfinite(r["chunk_ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
