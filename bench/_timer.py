"""Timing for the benchmarks: a callback that times training steps inside `flowdiff fit`, and
whole flowdiff commands in fresh processes."""

import json
import os
import re
import time

import lightning as L


def run_logged(args: list, log) -> float:
    """``flowdiff ARGS`` in a fresh process, its output to the file ``log``; its wall time (s)."""
    import subprocess
    import sys
    from pathlib import Path

    Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "flowdiff.cli", *map(str, args)], stdout=out,
                       stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return time.perf_counter() - start


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of training (validation,
    checkpointing and logging included); writes ``{"steps", "seconds"}`` to $FLOWDIFF_BENCH_OUT.
    On a GPU the clock reads wait for the queued work (twice a run)."""

    def __init__(self, warmup: int = 100):
        self.warmup, self.start, self.first = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            _synchronize(pl_module)
            self.start, self.first = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        _synchronize(pl_module)
        seconds = time.perf_counter() - self.start
        with open(os.environ["FLOWDIFF_BENCH_OUT"], "w") as f:
            json.dump({"steps": trainer.global_step - self.first, "seconds": seconds}, f)


def _synchronize(pl_module) -> None:
    if pl_module.device.type == "cuda":
        import torch

        torch.cuda.synchronize(pl_module.device)


def timed_fit(fit_args: list[str], workdir, warmup: int = 100) -> dict:
    """Run `flowdiff fit FIT_ARGS` in a fresh process with a StepTimer; its timing (and, for a
    compiled network, ``compile_seconds``: the first batch, compilation included)."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    out = Path(workdir) / f"timing-{time.time_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "flowdiff.cli",
        "fit",
        *fit_args,
        "--trainer.callbacks+=_timer.StepTimer",
        "--trainer.callbacks.init_args.warmup",
        str(warmup),
    ]
    env = {
        **os.environ,
        "FLOWDIFF_BENCH_OUT": str(out),
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("WANDB_MODE", "offline")
    run = subprocess.run(
        cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    timing = json.loads(out.read_text())
    compiled = re.search(r"network compiled in ([0-9.]+) s", run.stdout)
    if compiled:  # --model.compile true: the first batch's time, compilation included
        timing["compile_seconds"] = float(compiled.group(1))
    return timing


class CPUBudget(L.Callback):
    """Stops training once this process has used ``seconds`` of CPU time (all its threads), counted
    from the start of training: equal CPU budgets for networks that run at different speeds, which
    other work on a shared machine changes less than it changes wall time (with one thread)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_start(self, trainer, pl_module):
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if time.process_time() - self.start >= self.seconds:
            trainer.should_stop = True


class CPUStepTimer(L.Callback):
    """CPU time of this process (all threads) from the start of step ``warmup`` to the end of
    training; writes ``{"steps", "cpu_seconds"}`` to $FLOWDIFF_BENCH_OUT."""

    def __init__(self, warmup: int = 20):
        self.warmup, self.start, self.first = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self.start, self.first = time.process_time(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        seconds = time.process_time() - self.start
        with open(os.environ["FLOWDIFF_BENCH_OUT"], "w") as f:
            json.dump({"steps": trainer.global_step - self.first, "cpu_seconds": seconds}, f)
