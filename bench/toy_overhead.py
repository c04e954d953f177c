"""Where flowdiff's time goes on top of Lightning's loop in a 2D toy step, part by part, in one
process.

`bench/toy_throughput.py` compares whole runs; on a shared machine two runs of the same loop
differ by up to 20%, more than the overhead it looks for. This bench instead trains
`flowdiff fit --config toy.yaml` (CFM objective, as toy_throughput) for ``--steps`` steps, then,
at the end of that training, times each part flowdiff adds to a step in CPU time (medians of
repeated calls, so other processes matter little):

- the loss: flowdiff's (module, path, time sampling, objective) against the bare loop's four
  lines, forward and backward, same batch, both on an 8-wide MLP (medians of paired runs);
- every callback hook that runs at each step (EMA, amortized over its update interval; the
  non-finite guard; throughput; the learning-rate monitor; the checkpoint timer);
- logging, one ``log_metrics`` call every ``log_every_n_steps``;
- validation (samples, W2, MMD, the picture) and the checkpoint it writes, every ``--val-every``
  steps (toy.yaml: 3,000; toy_throughput: half its steps);

against the toy step itself: the bare loop's step (forward, backward, fused Adam) of toy.yaml's
MLP, timed the same way. Lightning's own loop is `bench/lightning_floor.py`. Run by hand:

    python bench/toy_overhead.py [--steps 300] [--val-every 1500] [--calls 500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

RESULTS: dict[str, float] = {}
SCALE = {"calls": 1.0}  # --calls / 500: fewer calls for a smoke test


def cpu_us(call, n: int = 500, repeats: int = 5) -> float:
    """Median over ``repeats`` of the CPU time of one call (µs), each timed over ``n`` calls."""
    n, times = max(1, round(n * SCALE["calls"])), []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            call()
        times.append((time.process_time() - start) / n * 1e6)
    return statistics.median(times)


class Probe(L.Callback):
    """At the end of training, times the parts of a step into RESULTS (µs a step)."""

    def __init__(self, val_every: int = 1500):
        self.val_every = val_every

    def on_train_end(self, trainer, pl_module):
        callbacks = {type(c).__name__: c for c in trainer.callbacks}
        batch = next(iter(trainer.datamodule.train_dataloader()))
        z, y = batch[:2]
        # The loss's overhead does not grow with the network: both losses run an 8-wide MLP, so
        # that the arithmetic they share does not drown the difference.
        from flowdiff.nets.mlp import MLP

        real, pl_module.net = pl_module.net, MLP(hidden=8, depth=3, num_classes=0)
        net = pl_module.net

        def flowdiff_loss():
            pl_module.loss(z, y).backward()

        def bare_loss():
            t, eps = torch.rand(z.shape[0]), torch.randn_like(z)
            x_t = t[:, None] * z + (1 - t[:, None]) * eps
            (net(x_t, t) - (z - eps)).square().mean().backward()

        pairs = [(cpu_us(flowdiff_loss, repeats=1), cpu_us(bare_loss, repeats=1)) for _ in range(9)]
        RESULTS["loss: flowdiff's against the bare loop's four lines"] = statistics.median(
            a - b for a, b in pairs
        )
        pl_module.net = real
        ema = callbacks["EMA"]  # (flowdiff before 2026-12-06: Lightning's update_parameters)
        update = getattr(ema, "_update", None) or ema._average_model.update_parameters
        RESULTS[f"EMA (an update every {ema.update_every_n_steps} steps)"] = (
            cpu_us(lambda: update(pl_module)) / ema.update_every_n_steps
        )
        guard, optimizer = callbacks["NonFiniteGuard"], trainer.optimizers[0]
        loss = torch.tensor(1.0)

        def guard_step():
            guard.on_before_backward(trainer, pl_module, loss)
            guard.on_before_optimizer_step(trainer, pl_module, optimizer)

        RESULTS["non-finite guard"] = cpu_us(guard_step)
        for name in ("Throughput", "LearningRateMonitor", "RunCheckpoint"):
            callback = callbacks[name]

            def hooks(callback=callback):
                callback.on_train_batch_start(trainer, pl_module, batch, 0)
                callback.on_train_batch_end(trainer, pl_module, None, batch, 0)

            RESULTS[f"{name} hooks"] = cpu_us(hooks)
        logger, every = pl_module.logger, trainer.log_every_n_steps
        RESULTS[f"logging (every {every} steps)"] = (
            cpu_us(lambda: logger.log_metrics({"bench": 1.0}, step=0), n=20) / every
        )
        path = f"{trainer.default_root_dir}/bench.ckpt"
        RESULTS[f"checkpoint (last.ckpt at each validation, every {self.val_every} steps)"] = (
            cpu_us(lambda: trainer.save_checkpoint(path), n=5) / self.val_every
        )
        pl_module.log_dict = lambda *args, **kwargs: None  # no self.log after training
        draw = callbacks["ValidationSamples"]._draw
        RESULTS[f"validation (every {self.val_every} steps)"] = (
            cpu_us(lambda: draw(trainer, pl_module, "val"), n=1) / self.val_every
        )


def toy_step_us(hidden: int) -> float:
    """The bare loop's step of the toy MLP (forward, backward, fused Adam), CPU µs."""
    from flowdiff.data.toy import DATASETS
    from flowdiff.nets.mlp import MLP

    net = MLP(hidden=hidden, depth=3, num_classes=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), fused=True)
    generator = torch.Generator().manual_seed(0)

    def step():
        z, _ = DATASETS["moons"](256, generator)
        t, eps = torch.rand(z.shape[0]), torch.randn_like(z)
        x_t = t[:, None] * z + (1 - t[:, None]) * eps
        loss = (net(x_t, t) - (z - eps)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return cpu_us(step, n=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=1500, help="validation interval")
    parser.add_argument("--calls", type=int, default=500, help="calls a timing of a step part")
    args = parser.parse_args()
    import toy_overhead  # the module the Probe is loaded from (this file runs as __main__)

    toy_overhead.SCALE["calls"] = args.calls / 500
    from flowdiff.cli import main as flowdiff

    with tempfile.TemporaryDirectory() as run:
        flowdiff([
            "fit", "--config", "toy.yaml", "--trainer.default_root_dir", run,
            "--model.objective", "flowdiff.objectives.ConditionalFlowMatching",
            "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=toy_overhead.Probe",
            "--trainer.callbacks.init_args.val_every", str(args.val_every),
        ])  # fmt: skip
    results = toy_overhead.RESULTS
    step = toy_overhead.toy_step_us(256)
    total = sum(results.values())
    print(f"| part (CPU time) | µs a step | of the bare toy step ({step:.0f} µs) |")
    print("|---|---|---|")
    for name, us in results.items():
        print(f"| {name} | {us:.1f} | {us / step:.1%} |")
    print(f"| **flowdiff's own, in all** | **{total:.1f}** | **{total / step:.1%}** |")


if __name__ == "__main__":
    main()
