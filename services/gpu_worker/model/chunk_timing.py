"""Measures a config's per-chunk compute time alone and batched: ``python -m services.gpu_worker.model.chunk_timing``.

Reports, per batch size n, the median time of one batched ``generate`` over n sessions and of n one-by-one calls,
so the coalescing gain (and the l(n) latency curve a scheduler needs) can be read off on the machine at hand.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.gpu_worker.model.loader import load_model
from services.gpu_worker.model.streaming_model import ReferenceStreamingModel

_WARMUP_CHUNKS = 4


@dataclass(frozen=True, slots=True)
class ChunkTiming:
    sessions: int
    batched_ms: float
    """Median wall time of one ``generate`` over all sessions."""
    one_by_one_ms: float
    """Median wall time of ``generate`` called once per session, in turn."""
    batched_best_ms: float
    """Fastest batched sample: closest to the uncontended figure on a shared machine."""
    one_by_one_best_ms: float

    @property
    def coalesced_speedup(self) -> float:
        return self.one_by_one_ms / self.batched_ms


def _samples_ms(action: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def measure(model: ReferenceStreamingModel, sessions: int, repeats: int) -> ChunkTiming:
    """Time chunks for ``sessions`` fresh sessions past their first chunks (cache partly full, then wrapping)."""
    handles = [model.new_session(f"timing-{sessions}-{i}", f"timing prompt {i}", i) for i in range(sessions)]
    for _ in range(_WARMUP_CHUNKS):
        model.generate(handles)
    batched = _samples_ms(lambda: model.generate(handles), repeats)
    one_by_one = _samples_ms(lambda: [model.generate([handle]) for handle in handles], repeats)
    for handle in handles:
        model.release(handle)
    return ChunkTiming(sessions, statistics.median(batched), statistics.median(one_by_one), min(batched),
                       min(one_by_one))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.config, max_sessions=max(args.sessions))
    print(f"config={args.config} threads={args.threads} repeats={args.repeats}")
    print(f"{'sessions':>8} {'batched ms':>11} {'one-by-one ms':>14} {'ms/session':>11} {'speedup':>8}"
          f" {'best batched':>13} {'best one-by-one':>16}")
    for sessions in args.sessions:
        t = measure(model, sessions, args.repeats)
        print(f"{t.sessions:>8} {t.batched_ms:>11.1f} {t.one_by_one_ms:>14.1f} {t.batched_ms / t.sessions:>11.1f}"
              f" {t.coalesced_speedup:>8.2f} {t.batched_best_ms:>13.1f} {t.one_by_one_best_ms:>16.1f}")


if __name__ == "__main__":
    main()
