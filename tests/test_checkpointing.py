"""When `flowdiff fit` writes last.ckpt: at every validation, not only when training ends."""

import json
from pathlib import Path

import lightning as L
import torch


class LastCheckpointProbe(L.Callback):
    """Records, at chosen steps, the step of the last.ckpt on disk (None: no file yet)."""

    def __init__(self, out: str, at: list[int]):
        self.out, self.at, self.seen = Path(out), set(at), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step in self.at and step not in self.seen:
            last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            ckpt = torch.load(last, weights_only=True) if last.exists() else None
            self.seen[step] = None if ckpt is None else ckpt["global_step"]
            self.out.write_text(json.dumps(self.seen))


def test_last_checkpoint_is_written_at_every_validation(tmp_path, run_cli):
    root, probe = tmp_path / "run", tmp_path / "probe.json"
    callback = {
        "class_path": "test_checkpointing.LastCheckpointProbe",
        "init_args": {"out": str(probe), "at": [30, 60, 110]},
    }
    code, _, err = run_cli(
        "fit", "--config", "toy.yaml", "--trainer.default_root_dir", root,
        "--trainer.logger", "false", "--model.net.init_args.hidden", "16",
        "--trainer.max_steps", "120", "--trainer.val_check_interval", "50",
        "--validation.num_samples", "100", "--trainer.callbacks", json.dumps([callback]),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(probe.read_text()) == {"30": None, "60": 50, "110": 100}
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 120
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]


def test_the_checkpoint_callback_keeps_lightning_state_key_and_follows_its_settings():
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    from flowdiff.checkpoint import RunCheckpoint

    def key(cls, **kwargs):  # Lightning's key names the class: compare the settings part
        return cls(**kwargs).state_key.removeprefix(cls.__name__)

    settings = {"save_last": True, "save_top_k": 0, "train_time_interval": timedelta(minutes=1)}
    assert key(RunCheckpoint, **settings) == key(ModelCheckpoint, **settings)
    callback = RunCheckpoint(**settings)
    first = callback.state_key
    assert callback.state_key is first  # kept, not rebuilt at every hook call
    callback._train_time_interval = None  # what flowdiff's CLI does for a step interval
    callback._every_n_train_steps = 500
    reference = ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=500)
    assert callback.state_key.removeprefix("RunCheckpoint") == reference.state_key.removeprefix(
        "ModelCheckpoint"
    )
