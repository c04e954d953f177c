"""Faults: a checkpoint write that fails midway, a training process killed at random moments, a
loss that turns non-finite, and checkpoints whose pickle would run code.

The classes ``IOProbe``, ``StepProbe`` and ``NaNToyData`` are given to ``flowdiff fit`` by class
path (``test_faults.X``): in-process, pytest has imported this file under that name; in a
subprocess, ``PYTHONPATH`` holds the tests directory.
"""

import builtins
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import flowdiff.checkpoint
from flowdiff.callbacks import TrainingError
from flowdiff.checkpoint import RunCheckpoint, SafeCheckpointIO, check_finite_weights
from flowdiff.data.toy import ToyDataModule
from flowdiff.utils import UsageError

HERE = Path(__file__).parent
SMALL = [
    "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "2",
    "--data.init_args.batch_size", "32",
    "--trainer.logger", "false",
    "--trainer.limit_val_batches", "0",
]  # fmt: skip


def fit_args(root: Path, *extra) -> list[str]:
    return ["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(root), *SMALL, *extra]


def tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """The floating-point weights of a checkpoint: EMA (state_dict) and raw ones."""
    out = {}
    for part in ("state_dict", "current_model_state"):
        for name, value in ckpt[part].items():
            if torch.is_tensor(value) and value.is_floating_point():
                out[f"{part}.{name}"] = value
    return out


def all_finite(ckpt: dict) -> bool:
    weights = tensors(ckpt)
    return bool(weights) and all(bool(torch.isfinite(w).all()) for w in weights.values())


# -- a. atomic checkpoint writes ------------------------------------------------------------------


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    targets = []

    def disk_full(obj, f, *args, **kwargs):
        targets.append(Path(f))
        Path(f).write_bytes(b"the first half of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flowdiff.checkpoint.torch, "save", disk_full)
    with pytest.raises(TrainingError, match="cannot write checkpoint .*the previous one is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    # torch.save wrote beside the target, never into it, and its partial file is gone
    assert len(targets) == 1 and targets[0].parent == path.parent and targets[0] != path
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1 and kept["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_write_removes_stale_temporary_files_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.k1ll3d.tmp"  # left by a process killed mid-write
    stale.write_bytes(b"half")
    other = tmp_path / ".other.ckpt.abc.tmp"  # another target's: not ours to remove
    other.write_bytes(b"half")
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4.0)}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.abc.tmp", "last.ckpt"]
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [0, 1, 2, 3]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("part", ["state_dict", "current_model_state"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, part, bad):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    before = path.read_bytes()
    weights = {"net.w": torch.tensor([1.0, bad]), "steps": torch.tensor([5])}
    ckpt = {"state_dict": {"net.w": torch.ones(2)}, "global_step": 4, part: weights}
    with pytest.raises(TrainingError) as info:
        SafeCheckpointIO().save_checkpoint(ckpt, path)
    assert f"weights at step 4 are not finite ({part}.net.w)" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # integer tensors and finite weights pass
    check_finite_weights({"state_dict": {"w": torch.ones(2), "n": torch.tensor([7])}}, path)


def test_last_link_replaces_the_old_one_atomically(tmp_path):
    """RunCheckpoint's ``save_last="link"``: last.ckpt becomes a relative link to the new file, made
    under a temporary name and renamed over the old last.ckpt (a regular file here)."""
    (tmp_path / "step=4.ckpt").write_bytes(b"four")
    (tmp_path / "last.ckpt").write_bytes(b"an older last checkpoint")
    barriers = []
    trainer = SimpleNamespace(
        is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: barriers.append(1))
    )
    RunCheckpoint._link_checkpoint(
        trainer, str(tmp_path / "step=4.ckpt"), str(tmp_path / "last.ckpt")
    )
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step=4.ckpt"
    assert last.read_bytes() == b"four"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=4.ckpt"]
    assert barriers == [1]


class IOProbe(L.Callback):
    """Records the checkpoint I/O of the run's strategy (in-process runs only)."""

    seen: list = []

    def on_fit_start(self, trainer, pl_module):
        IOProbe.seen.append(type(trainer.strategy.checkpoint_io))


def test_fit_writes_through_safe_checkpoint_io(tmp_path, run_cli, monkeypatch):
    IOProbe.seen.clear()
    root = tmp_path / "run"
    probe = json.dumps([{"class_path": "test_faults.IOProbe"}])
    args = fit_args(root, "--trainer.max_steps", "4", "--trainer.callbacks", probe)
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert IOProbe.seen == [SafeCheckpointIO]
    ckpt_file = root / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt_file, weights_only=True)["global_step"] == 4
    before = ckpt_file.read_bytes()

    # Resuming with a disk that fails: one error line, exit 1, the step-4 checkpoint intact.
    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flowdiff.checkpoint.torch, "save", disk_full)
    args = fit_args(root, "--trainer.max_steps", "8", "--ckpt_path", "last")
    code, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("flowdiff: error: cannot write checkpoint")
    assert "No space left on device" in lines[0] and "Traceback" not in err
    assert ckpt_file.read_bytes() == before
    assert sorted(p.name for p in ckpt_file.parent.iterdir()) == ["last.ckpt"]


# -- b. killed at random moments, resumed ---------------------------------------------------------


class StepProbe(L.Callback):
    """Appends the global step at the start and at the end of training to ``path`` (a JSON line
    each), so a test can see where a resumed run started."""

    def __init__(self, path: str):
        self.path = Path(path)

    def _write(self, event: str, trainer) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "step": trainer.global_step}) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._write("start", trainer)

    def on_train_end(self, trainer, pl_module):
        self._write("end", trainer)


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ckpt_version(path: Path):
    """Something that changes whenever last.ckpt is replaced (None when absent)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _wait_for_new_checkpoint(proc, path: Path, old, timeout: float) -> None:
    """Wait until ``path`` is replaced by ``proc`` (it differs from ``old``); fail on timeout or if
    the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ckpt_version(path) not in (None, old):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before a new checkpoint")
        time.sleep(0.02)
    pytest.fail(f"no new checkpoint within {timeout} s")


MAX_STEPS = 3000
EVERY = 20


def test_sigkill_at_random_moments_then_resume(tmp_path, run_cli):
    rng = random.Random(1234)
    root, probe = tmp_path / "run", tmp_path / "steps.jsonl"
    last = root / "checkpoints" / "last.ckpt"
    flowdiff = Path(sys.executable).with_name("flowdiff")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    callbacks = json.dumps(
        [{"class_path": "test_faults.StepProbe", "init_args": {"path": str(probe)}}]
    )
    args = fit_args(
        root,
        "--trainer.max_steps", str(MAX_STEPS),
        "--data.init_args.batches_per_epoch", "100000",
        "--checkpoint.every_n_train_steps", str(EVERY),
        "--trainer.callbacks", callbacks,
    )  # fmt: skip

    def start(*extra):
        log = open(tmp_path / f"log{len(_events(probe))}.txt", "w")
        return subprocess.Popen(
            [str(flowdiff), *args, *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    kills = 3
    resumed_from = []
    proc = start()
    for k in range(kills):
        old = _ckpt_version(last)
        try:
            _wait_for_new_checkpoint(proc, last, old, timeout=120)
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment: mid-step, mid-write, anywhere
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"kill {k}: the run ended by itself"
        # whatever moment the kill hit, last.ckpt is a whole checkpoint, loadable as data
        ckpt = torch.load(last, weights_only=True)
        step = ckpt["global_step"]
        assert 0 < step < MAX_STEPS and step % EVERY == 0
        assert all_finite(ckpt)
        resumed_from.append(step)
        proc = start("--ckpt_path", "last")

    assert proc.wait(timeout=300) == 0, (tmp_path / f"log{kills}.txt").read_text()[-3000:]
    events = _events(probe)
    starts = [e["step"] for e in events if e["event"] == "start"]
    ends = [e["step"] for e in events if e["event"] == "end"]
    # each resumed run started at the step of the checkpoint the kill left; only the last ended
    assert starts == [0, *resumed_from]
    assert resumed_from == sorted(resumed_from) and len(set(resumed_from)) == kills
    assert ends == [MAX_STEPS]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == MAX_STEPS and all_finite(final)
    # temporary files of writes cut short by a kill were removed by the next write
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]

    out = tmp_path / "samples"
    code, _, err = run_cli("sample", "--ckpt", last, "--num-samples", 100, "--steps", 5,
                           "--out", out)  # fmt: skip
    assert code == 0, err
    samples = torch.load(out / "samples.pt", weights_only=True)["samples"]
    assert samples.shape == (100, 2) and torch.isfinite(samples).all()


# -- c. a non-finite loss -------------------------------------------------------------------------


class NaNToyData(ToyDataModule):
    """Toy data whose n-th training batches (counted from 1) hold a nan: the batch of ``nan_at``,
    and every one from ``nan_from`` on (0: none)."""

    def __init__(self, nan_at: list[int] = [], nan_from: int = 0, **kwargs):  # noqa: B006
        super().__init__(**kwargs)
        self.nan_at, self.nan_from, self.batches = set(nan_at), nan_from, 0

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer is not None and self.trainer.training:
            self.batches += 1
            if self.batches in self.nan_at or 0 < self.nan_from <= self.batches:
                x = x.clone()
                x[0, 0] = float("nan")
        return x, y


# The guard's two checks: on the host every step (the CPU default), and on the device (the GPU
# default) with fused Adam's found_inf or, for other optimizers, a copy put back after the step.
GUARD_CHECKS = {
    "every-step": [],
    "device-fused": ["--nonfinite.check_every_step", "false"],
    "device-copy": ["--nonfinite.check_every_step", "false",
                    "--model.optimizer.init_args.fused", "false"],
}  # fmt: skip


@pytest.fixture(params=list(GUARD_CHECKS))
def guard(request) -> list[str]:
    return GUARD_CHECKS[request.param]


def nan_run(root: Path, *extra: str) -> list[str]:
    return fit_args(
        root,
        "--data.class_path", "test_faults.NaNToyData",
        "--data.init_args.batches_per_epoch", "1000",
        "--checkpoint.every_n_train_steps", "2",
        *extra,
    )  # fmt: skip


def test_nan_loss_stops_before_its_update(tmp_path, run_cli, guard):
    root = tmp_path / "run"
    code, _, err = run_cli(*nan_run(root, *guard,
                                    "--trainer.max_steps", "20", "--data.init_args.nan_at",
                                    "[7]"))  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and "Traceback" not in err
    last = root / "checkpoints" / "last.ckpt"
    assert lines[0] == (
        "flowdiff: error: training stopped: the loss is nan at step 7 (stopped before its update: "
        f"the weights are those of step 6); last checkpoint kept: {last}. Lower the learning rate, "
        "set --trainer.gradient_clip_val, or pass --nonfinite.action skip to skip such batches"
    )
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 6 and all_finite(ckpt)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_nan_loss_before_any_checkpoint(tmp_path, run_cli, guard):
    root = tmp_path / "run"
    code, _, err = run_cli(*nan_run(root, *guard,
                                    "--trainer.max_steps", "20", "--data.init_args.nan_at",
                                    "[1]"))  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "the loss is nan at step 1 " in err and "no checkpoint yet" in err
    assert not (root / "checkpoints").exists()


def test_nan_loss_skipped(tmp_path, run_cli, guard):
    root = tmp_path / "run"
    code, out, err = run_cli(*nan_run(root, *guard,
                                    "--trainer.max_steps", "12", "--data.init_args.nan_at",
                                      "[5, 9, 10]", "--nonfinite.action", "skip"))  # fmt: skip
    assert code == 0, err
    assert err.strip().splitlines() == [
        "flowdiff: the loss is nan at step 5: batch skipped (nonfinite.action=skip; later ones are "
        "counted in train/skipped_batches)"
    ]
    assert "flowdiff: skipped 3 batches with a non-finite loss" in out
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12  # 12 steps, 3 of them skipped (no gradient: no weight moved)
    guard = [v for k, v in ckpt["callbacks"].items() if k.startswith("NonFiniteGuard")]
    assert guard == [{"skipped": 3}]
    assert all_finite(ckpt)


def test_skipping_forever_stops(tmp_path, run_cli, guard):
    MAX_SKIPPED_IN_A_ROW = 100  # NonFiniteGuard's default

    root = tmp_path / "run"
    code, _, err = run_cli(*nan_run(root, *guard,
                                    "--trainer.max_steps", "500", "--data.init_args.nan_from",
                                    "4", "--nonfinite.action", "skip"))  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1
    assert lines[0].startswith("flowdiff: the loss is nan at step 4: batch skipped")
    assert len(lines) == 2 and lines[1].startswith(
        f"flowdiff: error: training stopped: the loss is nan at step 104, after "
        f"{MAX_SKIPPED_IN_A_ROW} skipped batches in a row; last checkpoint kept: "
    )
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 102 and all_finite(ckpt)  # skipped steps count as steps


# -- d. checkpoints whose pickle would run code ----------------------------------------------------


class SystemPayload:
    """Unpickling this runs ``touch MARKER`` (os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling this runs Python code (builtins.exec) that creates MARKER."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    from flowdiff.cli import main

    root = tmp_path_factory.mktemp("good") / "run"
    main(fit_args(root, "--trainer.max_steps", "2"))
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def malicious(tmp_path: Path, good: dict, payload: str, where: str) -> tuple[Path, Path]:
    """A checkpoint holding a payload: the whole file, or nested in a valid checkpoint's
    hyper_parameters. Returns (checkpoint, marker)."""
    marker = tmp_path / "MARKER"
    obj = (SystemPayload if payload == "system" else ExecPayload)(marker)
    path = tmp_path / "evil.ckpt"
    if where == "whole":
        torch.save(obj, path)
    else:
        ckpt = {**good, "hyper_parameters": dict(good["hyper_parameters"])}
        ckpt["hyper_parameters"]["net"] = {**ckpt["hyper_parameters"]["net"], "note": obj}
        torch.save(ckpt, path)
    return path, marker


@pytest.mark.parametrize("payload", ["system", "exec"])
def test_malicious_payload_is_live(tmp_path, good_ckpt, payload):
    """The control: loaded as code (weights_only=False), the checkpoint does create the marker."""
    path, marker = malicious(tmp_path, good_ckpt, payload, "nested")
    torch.load(path, weights_only=False)
    assert marker.exists()


COMMANDS = {
    "sample": lambda ckpt, tmp: ["sample", "--ckpt", ckpt, "--out", tmp / "out"],
    "evaluate": lambda ckpt, tmp: ["evaluate", "--ckpt", ckpt, "--out", tmp / "out"],
    "fit": lambda ckpt, tmp: fit_args(tmp / "out", "--ckpt_path", ckpt),
}


@pytest.mark.parametrize("where", ["whole", "nested"])
@pytest.mark.parametrize("payload", ["system", "exec"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_malicious_checkpoint_is_refused(tmp_path, good_ckpt, run_cli, command, payload, where):
    path, marker = malicious(tmp_path, good_ckpt, payload, where)
    global_name = "posix.system" if payload == "system" else "exec"  # as torch names them
    code, _, err = run_cli(*COMMANDS[command](path, tmp_path))
    assert code == 2
    assert err.strip().splitlines() == [
        f"flowdiff: error: refusing checkpoint {str(path)!r}: loading it would run or import "
        f"{global_name}, and a checkpoint is data, never code (flowdiff loads checkpoints with "
        "weights_only=True)"
    ]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_any_pickle_that_calls_is_refused(tmp_path, run_cli):
    """A hand-made protocol-0 pickle whose INST opcode calls os.system: weights_only stops at its
    first opcode, so no global is named, and the error says so without torch's advice to load it
    with weights_only=False. The control: plain ``pickle.loads`` of the same bytes runs it."""
    marker = tmp_path / "MARKER"
    payload = f"(S'touch {marker}'\nios\nsystem\n.".encode()
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "inst.ckpt"
    torch.save({"state_dict": {}}, path)
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, payload if info.filename.endswith("/data.pkl") else data)
    code, _, err = run_cli("sample", "--ckpt", path, "--out", tmp_path / "out")
    assert code == 2
    assert err.strip().splitlines() == [
        f"flowdiff: error: cannot read checkpoint {str(path)!r}: corrupt, truncated or not a "
        "safe PyTorch checkpoint (refused by weights_only=True: Unsupported operand 83)"
    ]  # 83: the STRING opcode, which weights_only does not read at all
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content",
    [b"X", b"h", b"hm", b")", b"a file, not a checkpoint\n", b"U\xc8\x18\xad", b"PK\x03\x04"],
    ids=["struct", "index", "key", "eof", "append", "unicode", "zip-header"],
)
def test_malformed_files_are_one_line(tmp_path, run_cli, content):
    """Bytes that make torch's weights-only unpickler fail in its many ways (struct.error,
    IndexError, KeyError, EOFError, UnicodeDecodeError, ...): one line, never a traceback."""
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    code, _, err = run_cli("sample", "--ckpt", path, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"flowdiff: error: cannot read checkpoint {str(path)!r}: corrupt")
    assert not (tmp_path / "out").exists()


def test_checkpoint_io_reads_as_data_whatever_the_caller_asks(tmp_path, good_ckpt):
    path, marker = malicious(tmp_path, good_ckpt, "system", "nested")
    with pytest.raises(UsageError, match="refusing checkpoint"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


@pytest.mark.parametrize("fused", [True, False])
def test_device_skip_leaves_weights_and_optimizer_state(fused):
    """The device-side skip (no host read): a skipped step leaves every weight and every tensor
    of Adam's state bit for bit as it was; an unskipped one moves them."""
    from flowdiff.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    guard = NonFiniteGuard(check_every_step=False)
    optimizer.register_step_post_hook(guard._after_step)

    def step(skip: bool, grad: float) -> None:
        for p in net.parameters():
            p.grad = torch.full_like(p, grad)
        guard._skip = torch.tensor(skip)
        guard._before_step(trainer, optimizer)
        optimizer.step()

    def state() -> list[torch.Tensor]:
        opt = [v.clone() for s in optimizer.state.values() for v in s.values()]
        return [p.detach().clone() for p in net.parameters()] + opt

    step(False, 1.0)  # Adam's state exists from here on
    before = state()
    step(True, float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))
    assert getattr(optimizer, "found_inf", None) is None  # taken off after the step
    step(False, 1.0)
    assert not any(torch.equal(a, b) for a, b in zip(before, state(), strict=True))
