"""Rectified flow: ``flowdiff reflow`` (couplings of a teacher, resumable), the reflow datamodule
and the ``stored`` coupling, ``--init_from``, and the straightness measure."""

import functools
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

import flowdiff.reflow as reflow
from flowdiff.checkpoint import load_run
from flowdiff.data.pairs import TensorPairsDataModule
from flowdiff.data.reflow import ReflowDataModule
from flowdiff.data.toy import ToyDataModule
from flowdiff.evaluate.sharding import chunk_generator
from flowdiff.module import FlowModule
from flowdiff.nets.mlp import MLP
from flowdiff.objectives import ConditionalFlowMatching
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import EulerSampler, HeunSampler
from flowdiff.straightness import straightness
from flowdiff.utils import UsageError


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny teachers trained 3 steps: unconditional moons, and conditional with dropout."""
    base = tmp_path_factory.mktemp("teachers")
    ckpts = {}
    for name, classes, p_uncond in (("plain", 0, 0.0), ("cond", 2, 0.2)):
        torch.manual_seed(0)
        model = FlowModule(MLP(hidden=32, depth=2, num_classes=classes), GaussianConditionalPath(),
                           ConditionalFlowMatching(), EulerSampler(4))  # fmt: skip
        data = ToyDataModule("moons", batch_size=64, batches_per_epoch=3, p_uncond=p_uncond)
        fit = trainer(3)
        fit.fit(model, data)
        ckpts[name] = base / name / "checkpoints" / "last.ckpt"
        fit.save_checkpoint(ckpts[name])
    return ckpts


def run_reflow(ckpt, out, *args):
    argv = ["--ckpt", str(ckpt), "--num-pairs", "250", "--batch-size", "100", "--out", str(out)]
    return reflow.reflow_main([*argv, *args])


@pytest.mark.parametrize("kind, extra", [("plain", []), ("cond", ["--guidance", "2"])])
def test_pairs_reproduce_the_teachers_samples(teachers, tmp_path, kind, extra):
    out = run_reflow(teachers[kind], tmp_path / "pairs.pt", "--sampler", "heun", "--steps", "3",
                     *extra)  # fmt: skip
    pairs = torch.load(out, weights_only=True)
    assert not out.with_name("pairs.pt.parts").exists()
    model = load_run(teachers[kind]).model
    guidance = 2.0 if kind == "cond" else None
    for c, (lo, hi) in enumerate([(0, 100), (100, 200), (200, 250)]):
        # The chunk's generator draws the noise, then the labels (moons: two classes alike).
        generator = chunk_generator(0, c)
        noise = torch.randn(hi - lo, 2, generator=generator)
        y = None
        if kind == "cond":
            y = torch.multinomial(torch.tensor([0.5, 0.5], dtype=torch.float64), hi - lo,
                                  replacement=True, generator=generator)  # fmt: skip
        expected = model.sample(hi - lo, HeunSampler(3), y=y, guidance=guidance,
                                generator=chunk_generator(0, c))  # fmt: skip
        assert torch.equal(pairs["x"][lo:hi], expected.x)  # bit for bit
        assert torch.equal(pairs["x_0"][lo:hi], noise)
        if y is not None:
            assert torch.equal(pairs["y"][lo:hi], y)
    assert ("y" in pairs) == (kind == "cond")
    assert pairs["teacher"]["sampler"] == "HeunSampler(steps=3)"
    assert pairs["teacher"]["guidance"] == guidance
    assert pairs["teacher"]["data"]["class_path"] == "flowdiff.data.toy.ToyDataModule"


def test_a_killed_reflow_resumes_without_redrawing_finished_chunks(teachers, tmp_path, monkeypatch):
    drawn = []
    original = reflow.draw_chunk

    def killed_after_first(model, sampler, c, *args):
        if drawn:
            raise KeyboardInterrupt  # the process dies here
        drawn.append(c)
        return original(model, sampler, c, *args)

    monkeypatch.setattr(reflow, "draw_chunk", killed_after_first)
    out = tmp_path / "pairs.pt"
    with pytest.raises(KeyboardInterrupt):
        run_reflow(teachers["plain"], out)
    parts = tmp_path / "pairs.pt.parts"
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == [
        "chunk-000000.pt", "manifest.json"]  # fmt: skip
    first = parts / "chunk-000000.pt"
    before = (first.stat().st_mtime_ns, first.read_bytes())

    drawn.clear()

    def counted(model, sampler, c, *args):
        drawn.append(c)
        assert first.stat().st_mtime_ns == before[0] and first.read_bytes() == before[1]
        return original(model, sampler, c, *args)

    monkeypatch.setattr(reflow, "draw_chunk", counted)
    run_reflow(teachers["plain"], out)
    assert drawn == [1, 2]  # chunk 0 was kept, not drawn again
    assert not parts.exists()
    monkeypatch.setattr(reflow, "draw_chunk", original)
    whole = run_reflow(teachers["plain"], tmp_path / "whole.pt")
    resumed, uninterrupted = (torch.load(p, weights_only=True) for p in (out, whole))
    for key in ("x", "x_0"):
        assert torch.equal(resumed[key], uninterrupted[key])


def test_overwrite_draws_every_chunk_anew(teachers, tmp_path, monkeypatch):
    """``--overwrite true`` with unchanged settings replaces the finished chunks of an earlier
    run too, as its help says (it used to keep them and draw only the others)."""
    drawn = []
    original = reflow.draw_chunk

    def killed_after_first(model, sampler, c, *args):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(c)
        return original(model, sampler, c, *args)

    monkeypatch.setattr(reflow, "draw_chunk", killed_after_first)
    out = tmp_path / "pairs.pt"
    with pytest.raises(KeyboardInterrupt):
        run_reflow(teachers["plain"], out)
    assert (tmp_path / "pairs.pt.parts" / "chunk-000000.pt").exists()

    drawn.clear()

    def counted(model, sampler, c, *args):
        drawn.append(c)
        return original(model, sampler, c, *args)

    monkeypatch.setattr(reflow, "draw_chunk", counted)
    run_reflow(teachers["plain"], out, "--overwrite", "true")
    assert drawn == [0, 1, 2]
    assert out.exists() and not (tmp_path / "pairs.pt.parts").exists()


def test_labels_follow_the_class_frequencies_of_imbalanced_data(tmp_path):
    """A teacher of a mixture weighted 0.8 / 0.2 records those frequencies with its data, and
    reflow draws its labels from them: the count of class 1 in 2,000 pairs is Binomial(2000,
    0.2), mean 400 and sd 17.9; 5 sd is 89 (uniform labels gave 1,000)."""
    torch.manual_seed(0)
    model = FlowModule(MLP(hidden=16, depth=2, num_classes=2), GaussianConditionalPath(),
                       ConditionalFlowMatching(), EulerSampler(2))  # fmt: skip
    mixture = {"means": [[-2.0, 0.0], [2.0, 0.0]], "weights": [4.0, 1.0]}
    data = ToyDataModule("mixture", batch_size=32, batches_per_epoch=1, mixture=mixture,
                         p_uncond=0.1)  # fmt: skip
    fit = trainer(1)
    fit.fit(model, data)
    ckpt = tmp_path / "teacher.ckpt"
    fit.save_checkpoint(ckpt)
    recorded = load_run(ckpt).checkpoint["data"]["class_frequencies"]
    torch.testing.assert_close(torch.tensor(recorded), torch.tensor([0.8, 0.2]))
    argv = ["--ckpt", str(ckpt), "--num-pairs", "2000", "--batch-size", "500", "--out",
            str(tmp_path / "pairs.pt"), "--sampler", "euler", "--steps", "1"]  # fmt: skip
    pairs = torch.load(reflow.reflow_main(argv), weights_only=True)
    assert pairs["teacher"]["class_frequencies"] == recorded
    assert abs(int((pairs["y"] == 1).sum()) - 400) < 89


def test_pairs_data_records_its_training_class_frequencies(tmp_path):
    """Counted on the training rows alone, exactly."""
    y = torch.tensor([0] * 30 + [1] * 8 + [2] * 2)
    torch.save({"x": torch.randn(40, 2), "y": y}, tmp_path / "d.pt")
    data = TensorPairsDataModule(str(tmp_path / "d.pt"), val_fraction=0.25)
    counts = torch.bincount(y[data.train_rows], minlength=3).double()
    assert data.describe()["class_frequencies"] == (counts / 30).tolist()


def snapshot(root: Path) -> dict:
    return {str(p): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing-ckpt", ["not found"]),
        ("existing-out", ["exists", "--overwrite"]),
        ("zero-pairs", ["num_pairs"]),
        ("negative-pairs", ["num_pairs"]),
        ("foreign-parts", ["not a resumable reflow output"]),
        ("other-settings", ["other settings", "seed"]),
        ("not-pt", ["expected a .pt file"]),
        ("stochastic-sampler", ["EulerMaruyamaSampler", "draws fresh noise", "--sampler heun"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(teachers, tmp_path, run_cli, case, words):
    out = tmp_path / "work" / "pairs.pt"
    out.parent.mkdir()
    args = ["reflow", "--ckpt", teachers["plain"], "--num-pairs", "250", "--out", out]
    if case == "missing-ckpt":
        args[2] = tmp_path / "nope.ckpt"
    elif case == "existing-out":
        out.write_bytes(b"something else")
    elif case in ("zero-pairs", "negative-pairs"):
        args[4] = "0" if case == "zero-pairs" else "-5"
    elif case == "foreign-parts":
        (tmp_path / "work" / "pairs.pt.parts").mkdir()
        (tmp_path / "work" / "pairs.pt.parts" / "chunk-000000.pt").write_bytes(b"not ours")
    elif case == "other-settings":
        parts = tmp_path / "work" / "pairs.pt.parts"
        parts.mkdir()
        ckpt = Path(teachers["plain"])
        stat = ckpt.stat()
        (parts / "manifest.json").write_text(json.dumps({
            "checkpoint": str(ckpt.resolve()), "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns, "sampler": "EulerSampler(steps=4)",
            "guidance": None, "seed": 7, "num_pairs": 250, "batch_size": 1000}))  # fmt: skip
    elif case == "not-pt":
        args[6] = tmp_path / "work" / "pairs.npz"
    elif case == "stochastic-sampler":
        args += ["--sampler", "euler-maruyama", "--steps", "4"]
    before = snapshot(tmp_path)
    code, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("flowdiff: error: "), err
    for word in words:
        assert word in lines[0]
    assert snapshot(tmp_path) == before


def test_reflow_data_batches_keep_pairs_and_score_against_the_teachers_data(teachers, tmp_path):
    out = run_reflow(teachers["cond"], tmp_path / "pairs.pt", "--steps", "2")
    pairs = torch.load(out, weights_only=True)
    data = ReflowDataModule(str(out), batch_size=64, val_fraction=0.1)
    assert data.stores_noise and data.num_classes == 2 and data.data_shape == (2,)
    x, y, x_0 = next(iter(data.val_dataloader()))
    rows = data.val_rows[:64]
    assert torch.equal(x, pairs["x"][rows]) and torch.equal(x_0, pairs["x_0"][rows])
    assert torch.equal(y, pairs["y"][rows])
    teacher_data = ToyDataModule("moons", batch_size=64, batches_per_epoch=3, p_uncond=0.2)
    for got, want in zip(data.reference(50, 3), teacher_data.reference(50, 3), strict=True):
        assert torch.equal(got, want)  # the real moons, not the teacher's samples


def test_stored_coupling_needs_stored_noise(teachers):
    model = FlowModule(MLP(hidden=16, depth=2), GaussianConditionalPath(),
                       ConditionalFlowMatching(), coupling="stored")  # fmt: skip
    with pytest.raises(UsageError, match="coupling stored"):
        trainer(1).fit(model, ToyDataModule("moons", batch_size=16, batches_per_epoch=1))


def test_two_rectified_flow_recovers_a_linear_map(tmp_path):
    """Couplings ``x_1 = A x_0 + b`` with A's eigenvalues > 0: the paths ``x_t = ((1 - t) I + t A)
    x_0 + t b`` never cross, the field is the constant ``(A - I) x_0 + b`` along each straight
    line, and one Euler step of the trained student maps x_0 to ``A x_0 + b``."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([[1.5, 0.4], [-0.3, 0.7]]), torch.tensor([0.5, -1.0])
    x_0 = torch.randn(20_000, 2, generator=g)
    path = tmp_path / "linear.pt"
    torch.save({"x": x_0 @ a.T + b, "x_0": x_0, "teacher": {"data": {}}}, path)
    torch.manual_seed(0)
    model = FlowModule(MLP(hidden=64, depth=2), GaussianConditionalPath(t_min=0.0, t_max=1.0),
                       ConditionalFlowMatching(), EulerSampler(1), coupling="stored",
                       optimizer=functools.partial(torch.optim.Adam, lr=3e-3))  # fmt: skip
    data = ReflowDataModule(str(path), batch_size=256, val_fraction=0.01)
    trainer(600).fit(model, data)
    x = torch.randn(500, 2, generator=g)
    with torch.no_grad():
        one_step = EulerSampler(1).sample(model.field(), x, 0.0, 1.0).x
    # The bound is a share of what is checked: the jump covers a mean distance
    # E||(A - I) x_0 + b|| (1.23); the student's one step must land within a tenth of it.
    error = (one_step - (x @ a.T + b)).norm(dim=1)
    travel = (x @ a.T + b - x).norm(dim=1)
    assert error.mean() < travel.mean() / 10, (error.mean(), travel.mean())


def test_a_logger_gets_both_paths(teachers, tmp_path):
    """The module's probability path and the reflow file's path both reach a logger (Lightning
    refused to merge the two under one key, so any logged reflow run failed at its start)."""
    out = run_reflow(teachers["plain"], tmp_path / "pairs.pt", "--steps", "2")
    model = FlowModule(MLP(hidden=32, depth=2), GaussianConditionalPath(),
                       ConditionalFlowMatching(), coupling="stored")  # fmt: skip
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    fit = L.Trainer(max_steps=1, logger=logger, enable_checkpointing=False,
                    enable_progress_bar=False, limit_val_batches=0)  # fmt: skip
    fit.fit(model, ReflowDataModule(str(out), batch_size=64))
    logged = logger.experiment.hparams
    assert logged["data"]["init_args"]["path"] == str(out)
    assert logged["data"]["class_path"] == "flowdiff.data.reflow.ReflowDataModule"
    assert isinstance(logged["path"], GaussianConditionalPath)  # the module's, as it was given


def test_init_from_starts_from_the_teachers_weights(teachers):
    teacher = load_run(teachers["plain"])
    student = FlowModule(MLP(hidden=32, depth=2), GaussianConditionalPath(),
                         ConditionalFlowMatching())  # fmt: skip
    student.init_weights(teacher.checkpoint, "teacher")
    expected = teacher.model.net.state_dict()
    for name, p in student.net.state_dict().items():
        assert torch.equal(p, expected[name]), name
    other = FlowModule(
        MLP(hidden=16, depth=2), GaussianConditionalPath(), ConditionalFlowMatching()
    )
    with pytest.raises(UsageError, match="does not fit"):
        other.init_weights(teacher.checkpoint, "teacher")


def test_toy_reflow_config_trains_from_the_teacher_and_evaluates_in_one_step(
    teachers, tmp_path, run_cli
):
    """The shipped toy_reflow.yaml (with the tiny teacher's network size), --init_from, and the
    student's evaluate rows at 1 and 2 NFE."""
    out = run_reflow(teachers["plain"], tmp_path / "pairs.pt", "--steps", "2")
    root = tmp_path / "student"
    common = ["fit", "--config", "toy_reflow.yaml", "--trainer.default_root_dir", root,
              "--trainer.logger", "false", "--model.net.init_args.hidden", "32",
              "--model.net.init_args.depth", "2", "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--validation.num_samples", "50",
              "--data.init_args.path", out]  # fmt: skip
    code, _, err = run_cli(*common, "--init_from", tmp_path / "nope.ckpt")
    assert code == 2 and "not found" in err and not root.exists()
    code, _, err = run_cli(*common[:-2], "--init_from", teachers["plain"])
    assert code == 2 and "data.path is required" in err
    code, _, err = run_cli(*common, "--init_from", teachers["plain"])
    assert code == 0, err
    ckpt = root / "checkpoints" / "last.ckpt"
    code, stdout, err = run_cli("evaluate", "--ckpt", ckpt, "--steps", "1,2", "--num-samples",
                                "100", "--nll", "false", "--wandb", "false", "--straightness",
                                "false")  # fmt: skip
    assert code == 0, err
    assert "straightness" not in stdout
    report = json.loads((root / "eval" / "seed0" / "metrics.json").read_text())
    assert [r["nfe"] for r in report["rows"]] == [1, 2] and report["floor"]["w2"] > 0


class ConstantSpeedField:
    """``v(x, t) = c`` (straight, S = 0) or ``v = 2 t c`` (straight but not at constant speed:
    S = ||c||^2 ∫ (1 - 2t)^2 dt = ||c||^2 / 3)."""

    def __init__(self, accelerating: bool):
        self.c, self.accelerating = torch.tensor([1.0, -2.0], dtype=torch.float64), accelerating

    def velocity(self, x, t):
        scale = 2 * t[:, None] if self.accelerating else torch.ones_like(t)[:, None]
        return scale * self.c


def test_straightness_closed_forms():
    x_0 = torch.randn(7, 2, dtype=torch.float64)
    assert straightness(ConstantSpeedField(False), x_0, 0.0, 1.0, 50).abs().max() < 1e-12
    s = straightness(ConstantSpeedField(True), x_0, 0.0, 1.0, 400)
    torch.testing.assert_close(s, torch.full((7,), 5.0 / 3, dtype=torch.float64), rtol=1e-4, atol=0)


def test_evaluate_reports_straightness(teachers, tmp_path, run_cli):
    out = tmp_path / "eval"
    code, stdout, err = run_cli("evaluate", "--ckpt", teachers["plain"], "--out", out, "--wandb",
                                "false", "--num-samples", "100", "--batch-size", "50", "--nll",
                                "false", "--steps", "1,2")  # fmt: skip
    assert code == 0, err
    assert "straightness: " in stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["straightness"]["straightness"] >= 0
    assert [r["nfe"] for r in report["rows"]] == [1, 2]
    assert os.path.exists(out / "quality_vs_nfe.png")


def test_which_samplers_are_deterministic():
    """Every ODE solver and MeanFlow's jumps map x_0 to one x_1; Euler–Maruyama draws noise,
    unless its diffusion is 0."""
    from flowdiff.samplers import SAMPLERS, EulerMaruyamaSampler

    assert {name for name, cls in SAMPLERS.items() if not cls().deterministic} == {"euler-maruyama"}
    assert EulerMaruyamaSampler(4, sigma=0.0).deterministic
