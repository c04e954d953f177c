"""Distributed training: `flowdiff fit` under DDP on 2 CPU processes (gloo), as a user runs it.

Lightning's launcher starts rank 1 by re-running the command line, so the whole CLI (config
resolution, the run-directory guard, W&B, `after_fit`) runs once per rank. ``RankProbe`` below is
added to the run through ``--trainer.callbacks``; the ranks import it from this file
(``PYTHONPATH``) and each writes down what it saw.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from flowdiff.data.batches import Batches
from flowdiff.data.toy import ToyDataModule

HERE = Path(__file__).parent
STEPS, BATCH = 20, 64
TINY = [
    "--model.net.init_args.hidden", "32",
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "10",
    "--data.init_args.batches_per_epoch", str(STEPS),
    "--data.init_args.batch_size", str(BATCH),
    "--validation.num_samples", "200",
]  # fmt: skip
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


class RankProbe(L.Callback):
    """Writes ``rank<R>.json`` and ``rank<R>-batch.pt`` into ``out``: the rank and world size, how
    many checkpoint files this rank wrote, and its first training batch."""

    def __init__(self, out: str):
        self.out, self.writes, self.first_batch = Path(out), 0, None

    def on_fit_start(self, trainer, pl_module):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def counted(*args, **kwargs):
            self.writes += 1
            return save(*args, **kwargs)

        io.save_checkpoint = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].detach().cpu().clone()

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.first_batch, self.out / f"rank{rank}-batch.pt")
        facts = {"rank": rank, "world_size": trainer.world_size, "writes": self.writes}
        (self.out / f"rank{rank}.json").write_text(json.dumps(facts))


def fit_ddp(root: Path, probe: Path, *extra: str) -> subprocess.CompletedProcess:
    """`flowdiff fit` (the console script) on 2 CPU ranks with the W&B logger offline."""
    flowdiff = Path(sys.executable).with_name("flowdiff")
    callbacks = [{"class_path": "test_distributed.RankProbe", "init_args": {"out": str(probe)}}]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    args = ["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(root), *DDP, *TINY]
    args += ["--trainer.callbacks", json.dumps(callbacks), *extra]
    return subprocess.run(
        [str(flowdiff), *args], capture_output=True, text=True, env=env, timeout=300
    )


def probes(probe: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(probe.glob("rank?.json"))}


def test_ddp_fit_on_two_cpu_ranks_then_sample(tmp_path, run_cli):
    root, probe = tmp_path / "run", tmp_path / "probe"
    result = fit_ddp(root, probe)
    assert result.returncode == 0, result.stderr[-3000:]

    # Both ranks trained, in one world of 2; only rank 0 wrote checkpoints.
    seen = probes(probe)
    assert sorted(seen) == [0, 1]
    assert all(facts["world_size"] == 2 for facts in seen.values())
    assert seen[0]["writes"] >= 1 and seen[1]["writes"] == 0

    # Each rank trained on its own batches; rank 0 on those a single-device run draws.
    first = [torch.load(probe / f"rank{r}-batch.pt", weights_only=True) for r in (0, 1)]
    assert first[0].shape == first[1].shape == (BATCH, 2)
    assert not torch.allclose(first[0], first[1])
    single = ToyDataModule(batch_size=BATCH, batches_per_epoch=STEPS).train_dataloader()
    torch.testing.assert_close(first[0], next(iter(single))[0])

    # The run directory: rank 1 did not refuse the directory rank 0 made; one checkpoint, at
    # max_steps; one W&B run; one report at the end.
    assert (root / "config.yaml").is_file()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1
    assert result.stdout.count("flowdiff: run directory") == 1
    assert result.stdout.count("wandb sync") == 1
    assert "Traceback" not in result.stderr

    # The checkpoint samples like any other.
    out = tmp_path / "samples"
    code, _, err = run_cli("sample", "--ckpt", root / "checkpoints" / "last.ckpt",
                           "--num-samples", 300, "--steps", 10, "--out", out)  # fmt: skip
    assert code == 0, err
    samples = torch.load(out / "samples.pt", weights_only=True)["samples"]
    assert samples.shape == (300, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize("n,world", [(103, 2), (103, 4), (100, 3)])
def test_mnist_ranks_split_each_epoch(n, world):
    """MNIST batches under DDP: every rank draws the same permutation and trains on its own share
    of it, with as many batches as every other rank (a rank with one batch more would hang DDP)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    labels = torch.arange(n)
    whole = [y for _, y in Batches(images, labels, 8, torch.Generator().manual_seed(5))]
    ranks = [
        list(Batches(images, labels, 8, torch.Generator().manual_seed(5), rank, world))
        for rank in range(world)
    ]
    assert len({len(batches) for batches in ranks}) == 1
    assert all(len(batches) == len(Batches(images, labels, 8, None, 0, world)) for batches in ranks)
    rows = [torch.cat([y for _, y in batches]) for batches in ranks]
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == -(-n // world)
    assert sorted(set(torch.cat(rows).tolist())) == list(range(n))  # every image, each epoch
    assert len(torch.cat(rows)) - n < world  # repeated: only the padding to equal shares
    # the same permutation as one device's, dealt out in turn
    order = torch.cat(whole)
    for rank, r in enumerate(rows):
        torch.testing.assert_close(r[: len(order[rank::world])], order[rank::world])
    # images and labels stay paired
    for batches in ranks:
        for x, y in batches:
            torch.testing.assert_close(x.flatten(), y.float() / 127.5 - 1)


@pytest.mark.slow
def test_ddp_overwrite_replaces_the_run_once(tmp_path):
    """`--overwrite true` under DDP: rank 1 sees the earlier run's config.yaml too; rank 0 alone
    clears the earlier checkpoints and samples, before any rank writes."""
    root, probe = tmp_path / "run", tmp_path / "probe"
    (root / "checkpoints").mkdir(parents=True)
    (root / "samples").mkdir()
    (root / "config.yaml").write_text("earlier run\n")
    (root / "checkpoints" / "last.ckpt").write_bytes(b"earlier checkpoint")
    (root / "samples" / "val_step0099999.png").write_bytes(b"earlier picture")

    result = fit_ddp(root, probe, "--overwrite", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(probes(probe)) == [0, 1]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "val_step0000010.png",
        "val_step0000020.png",
    ]
    assert (root / "config.yaml").read_text() != "earlier run\n"

    # Without --overwrite the directory is refused before any rank trains.
    before = (root / "checkpoints" / "last.ckpt").read_bytes()
    result = fit_ddp(root, tmp_path / "probe2")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == before


def test_reflow_on_two_ranks_writes_the_pairs_of_one(tmp_path):
    """``flowdiff reflow --devices 2``: each rank draws its chunks into OUT.parts/, rank 0 joins
    them; the file holds the same pairs as one rank's, bit for bit."""
    from flowdiff.module import FlowModule
    from flowdiff.nets.mlp import MLP
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.samplers import EulerSampler

    model = FlowModule(MLP(hidden=16, depth=2), GaussianConditionalPath(),
                       ConditionalFlowMatching(), EulerSampler(3))  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, ToyDataModule("moons", batch_size=16, batches_per_epoch=1))
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    flowdiff = Path(sys.executable).parent / "flowdiff"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pairs = []
    for devices in ("1", "2"):
        out = tmp_path / f"pairs{devices}.pt"
        cmd = [str(flowdiff), "reflow", "--ckpt", str(ckpt), "--num-pairs", "250",
               "--batch-size", "100", "--out", str(out), "--devices", devices]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert not (tmp_path / f"pairs{devices}.pt.parts").exists()
        pairs.append(torch.load(out, weights_only=True))
    for key in ("x", "x_0"):
        assert torch.equal(pairs[0][key], pairs[1][key])
    # --overwrite on two ranks: rank 0 alone removes the old parts once the ranks are connected.
    out = tmp_path / "pairs2.pt"
    (tmp_path / "pairs2.pt.parts").mkdir()
    (tmp_path / "pairs2.pt.parts" / "chunk-000000.pt").write_bytes(b"stale")
    cmd = [str(flowdiff), "reflow", "--ckpt", str(ckpt), "--num-pairs", "250", "--batch-size",
           "100", "--out", str(out), "--devices", "2", "--overwrite", "true"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    again = torch.load(out, weights_only=True)
    for key in ("x", "x_0"):
        assert torch.equal(again[key], pairs[0][key])
