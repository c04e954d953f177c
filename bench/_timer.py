"""A callback that times training steps inside `flowdiff fit`, for the benchmarks."""

import json
import os
import time

import lightning as L


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of training (validation,
    checkpointing and logging included); writes ``{"steps", "seconds"}`` to $FLOWDIFF_BENCH_OUT."""

    def __init__(self, warmup: int | None = None):
        warmup = warmup if warmup is not None else int(os.environ.get("FLOWDIFF_BENCH_WARMUP", 100))
        self.warmup, self.start, self.first = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self.start, self.first = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.start
        with open(os.environ["FLOWDIFF_BENCH_OUT"], "w") as f:
            json.dump({"steps": trainer.global_step - self.first, "seconds": seconds}, f)
