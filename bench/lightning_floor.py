"""What Lightning's own training loop costs a step, with nothing of flowdiff in it.

A LightningModule with one ``Linear(2, 2)``, fused Adam and automatic optimization, trained with no
callbacks, logger, checkpointing, progress bar or model summary, against the same three lines in
a bare loop (loss, backward, step) on the same batches, in one process. The arithmetic is next to
nothing, so the difference of the two step times is the loop's: the part of `flowdiff fit`'s
per-step overhead (`bench/toy_throughput.py --hidden 8`) that no change inside flowdiff removes.
Run by hand:

    python bench/lightning_floor.py [--steps 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

WARMUP = 100


class Batches(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(256, 2, generator=generator)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), fused=True)


class Clock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.ms = (time.perf_counter() - self.start) / (trainer.global_step - WARMUP) * 1e3


def lightning_ms(steps: int) -> float:
    clock = Clock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[clock],
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(Batches(), batch_size=None))
    return clock.ms


def bare_ms(steps: int) -> float:
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    batches = iter(torch.utils.data.DataLoader(Batches(), batch_size=None))
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        loss = model.layer(next(batches)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps - WARMUP) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from flowdiff.utils import skip_nvml_probe_without_driver

    skip_nvml_probe_without_driver()  # as `flowdiff` does (importing Lightning set it)
    rows = []
    for i in range(args.repeats):
        rows.append((lightning_ms(args.steps), bare_ms(args.steps)))
        print(
            f"repeat {i}: Lightning {rows[-1][0]:.3f} ms a step, bare {rows[-1][1]:.3f}", flush=True
        )
    lightning = statistics.median(r[0] for r in rows)
    bare = statistics.median(r[1] for r in rows)
    print(
        f"medians of {args.repeats}: Lightning's loop {lightning:.3f} ms a step, the bare loop "
        f"{bare:.3f}: the loop costs {lightning - bare:.3f} ms a step"
    )


if __name__ == "__main__":
    main()
