"""MeanFlow: the identity's target against closed forms, the JVP against finite differences, the
time pairs, the guided velocity, the one-step sampler, the interval input of the networks, and a
short training run."""

import functools
import json
import math

import lightning as L
import pytest
import torch
from torch import nn

from flowdiff.data.toy import ToyDataModule
from flowdiff.fields import Field, ModelField
from flowdiff.meanflow import MeanFlow, meanflow_target
from flowdiff.module import FlowModule
from flowdiff.nets.dit import DiT
from flowdiff.nets.mlp import MLP
from flowdiff.nets.unet import UNet
from flowdiff.objectives import ConditionalFlowMatching
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import MeanFlowSampler, get_sampler
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError, expand_like

DTYPE = torch.float64


def exact_path(schedule: str) -> GaussianConditionalPath:
    return GaussianConditionalPath(schedule, t_min=0.0, t_max=1.0)


class GaussianAverageVelocity:
    """The exact average velocity of one Gaussian ``N(mu, s^2 I)`` on a Gaussian path.

    Its ODE moves ``x_0`` to ``x_t = alpha_t mu + sigma_t x_0`` with ``sigma_t^2 = alpha_t^2 s^2 +
    beta_t^2``, so ``u(x_t, t, r) = (x_r - x_t) / (r - t)`` with ``x_0 = (x_t - alpha_t mu) /
    sigma_t``; r != t."""

    def __init__(self, path, mu, s):
        self.path, self.mu, self.s = path, mu, s

    def flow(self, t):
        c = self.path.schedule(t)
        return c.alpha_t[:, None], torch.sqrt(c.alpha_t**2 * self.s**2 + c.beta_t**2)[:, None]

    def __call__(self, x, t, r):
        alpha_t, sigma_t = self.flow(t)
        alpha_r, sigma_r = self.flow(r)
        x_0 = (x - alpha_t * self.mu) / sigma_t
        x_r = alpha_r * self.mu + sigma_r * x_0
        return (x_r - x) / (r - t)[:, None]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_target_equals_the_exact_average_velocity_of_a_gaussian(schedule):
    """With the exact u and the exact marginal v, the identity's right side is u itself."""
    path = exact_path(schedule)
    mu, s = torch.tensor([1.0, -2.0], dtype=DTYPE), 0.6
    field = GaussianMixtureField(path, [1.0], mu[None], [s])
    g = torch.Generator().manual_seed(0)
    t = 0.05 + 0.5 * torch.rand(64, generator=g, dtype=DTYPE)
    r = t + 0.05 + 0.4 * torch.rand(64, generator=g, dtype=DTYPE)
    x_t = torch.randn(64, 2, generator=g, dtype=DTYPE)
    u_exact = GaussianAverageVelocity(path, mu, s)
    u, target = meanflow_target(u_exact, x_t, t, r, field.velocity(x_t, t))
    torch.testing.assert_close(u, u_exact(x_t, t, r), rtol=0, atol=0)
    torch.testing.assert_close(target, u, rtol=1e-10, atol=1e-10)
    # A jump with the exact u lands on the ODE's solution.
    alpha_t, sigma_t = u_exact.flow(t)
    alpha_r, sigma_r = u_exact.flow(r)
    x_r = x_t + expand_like(r - t, x_t) * u
    torch.testing.assert_close(x_r, alpha_r * mu + sigma_r * (x_t - alpha_t * mu) / sigma_t)


def rk4_average_velocity(field: Field, steps: int):
    """``u(x, t, r) = (x_r - x) / (r - t)`` by RK4 on the field's ODE: differentiable, also in
    forward mode (no torch.no_grad, unlike the samplers)."""

    def u(x, t, r):
        h = (r - t) / steps
        y, s = x, t
        for _ in range(steps):
            k1 = field.velocity(y, s)
            k2 = field.velocity(y + expand_like(h / 2, y) * k1, s + h / 2)
            k3 = field.velocity(y + expand_like(h / 2, y) * k2, s + h / 2)
            k4 = field.velocity(y + expand_like(h, y) * k3, s + h)
            y = y + expand_like(h / 6, y) * (k1 + 2 * k2 + 2 * k3 + k4)
            s = s + h
        return (y - x) / expand_like(r - t, x)

    return u


def test_target_of_a_mixture_matches_its_ode_average_velocity():
    """Gaussian mixture: the average velocity from a fine ODE solve of the exact field satisfies
    the identity (target = u), and at r = t the target is the exact field."""
    path = exact_path("linear")
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], dtype=DTYPE)
    field = GaussianMixtureField(path, [0.5, 0.3, 0.2], means, [0.4, 0.7, 0.3])
    g = torch.Generator().manual_seed(1)
    t = 0.1 + 0.4 * torch.rand(6, generator=g, dtype=DTYPE)
    r = t + 0.1 + 0.4 * torch.rand(6, generator=g, dtype=DTYPE)
    x_t = 2 * torch.randn(6, 2, generator=g, dtype=DTYPE)
    u_ode = rk4_average_velocity(field, 40)
    u, target = meanflow_target(u_ode, x_t, t, r, field.velocity(x_t, t))
    torch.testing.assert_close(target, u, rtol=1e-6, atol=1e-6)
    # The target is not trivially u: with v off by delta it moves by delta (r = t) ...
    v = field.velocity(x_t, t)
    _, at_t = meanflow_target(lambda x, t, r: field.velocity(x, t), x_t, t, t, v)
    torch.testing.assert_close(at_t, v, rtol=0, atol=0)
    # ... and an average velocity of the wrong interval misses it.
    u_w, target_w = meanflow_target(lambda x, t, r: u_ode(x, t, (t + r) / 2), x_t, t, r, v)
    assert (target_w - u_w).abs().max() > 1e-2


def test_jvp_matches_finite_differences_of_the_network():
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=2, time_embed_dim=16, interval=True).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, generator=g, dtype=DTYPE)
    t = 0.2 + 0.3 * torch.rand(8, generator=g, dtype=DTYPE)
    r = t + 0.3 * torch.rand(8, generator=g, dtype=DTYPE)
    v = torch.randn(8, 2, generator=g, dtype=DTYPE)

    def u_fn(x, t, r):
        return net(x, t, None, r=r)

    def central(dx, dt, h=1e-6):
        return (u_fn(x + h * dx, t + h * dt, r) - u_fn(x - h * dx, t - h * dt, r)) / (2 * h)

    gap = expand_like(r - t, x)
    with torch.no_grad():
        d_t = central(torch.zeros_like(x), 1.0)
        d_x = central(v, 0.0)
    # In t alone (v = 0), then along (v, 1): d/dt u = v . grad_x u + d_t u.
    _, target = meanflow_target(u_fn, x, t, r, torch.zeros_like(x))
    torch.testing.assert_close(target, gap * d_t, rtol=1e-5, atol=1e-7)
    u, target = meanflow_target(u_fn, x, t, r, v)
    torch.testing.assert_close(target, v + gap * (d_x + d_t), rtol=1e-5, atol=1e-7)
    assert u.requires_grad and not target.requires_grad  # the target is stop-gradient
    u.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


class IntervalDiT(nn.Module):
    """A DiT with an interval input for the tests, ``u(x, t, r) = dit(x, t) + (r - t) dit(x, r)``
    (flowdiff's DiT has none yet); its weights all perturbed, so that adaLN-Zero's zero gates
    do not switch the attention off."""

    num_classes, interval = 0, True

    def __init__(self):
        super().__init__()
        self.dit = DiT(1, image_size=8, patch_size=4, hidden=16, depth=2, num_heads=2)
        with torch.no_grad():
            for p in self.dit.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, x, t, y=None, r=None):
        r = t if r is None else r
        return self.dit(x, t, y) + expand_like(r - t, x) * self.dit(x, r, y)


def attention_net(name: str) -> nn.Module:
    if name == "unet":  # cifar10.yaml's kind: attention at the second level
        return UNet(1, channels=(8, 16), num_res_blocks=1, time_embed_dim=16,
                    attention_levels=[1], interval=True, zero_init=False)  # fmt: skip
    return IntervalDiT()


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_the_loss_runs_through_attention_and_its_jvp_is_the_derivative(name):
    """Forward-mode AD is not implemented for the flash, memory-efficient and CPU flash kernels
    of ``scaled_dot_product_attention`` (the CPU picks its flash kernel in float32), so every
    network with attention crashed on its first MeanFlow loss after ``check()`` accepted it.
    Accepted now means trained: the loss and its gradients are finite, and the JVP through the
    attention is the derivative (central differences in float64, as for the MLP above)."""
    torch.manual_seed(0)
    net, path = attention_net(name), exact_path("linear")
    FlowModule(net, path, MeanFlow())  # check() accepts it
    g = torch.Generator().manual_seed(1)
    sample = path.sample(torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g))
    loss = MeanFlow(interval_fraction=0.5).loss(net, sample, path, generator=g)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())

    net.double()
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=DTYPE)
    t = 0.2 + 0.3 * torch.rand(3, generator=g, dtype=DTYPE)
    r, v = t + 0.3, torch.randn(3, 1, 8, 8, generator=g, dtype=DTYPE)

    def u_fn(x, t, r):
        return net(x, t, None, r=r)

    h = 1e-6
    with torch.no_grad():
        du_dt = (u_fn(x + h * v, t + h, r) - u_fn(x - h * v, t - h, r)) / (2 * h)
    _, target = meanflow_target(u_fn, x, t, r, v)
    torch.testing.assert_close(target, v + expand_like(r - t, x) * du_dt, rtol=1e-5, atol=1e-7)


def test_end_times():
    path = GaussianConditionalPath(t_min=0.0, t_max=1.0)
    n = 200_000
    g = torch.Generator().manual_seed(3)
    for fraction in (0.0, 0.25, 0.5):
        t = path.sample_time(n, generator=g)
        r = MeanFlow(interval_fraction=fraction).end_time(t, path, g)
        apart = r != t
        assert (r >= t).all()
        assert abs(apart.double().mean().item() - fraction) < 4 * math.sqrt(0.25 / n)
        if fraction:  # given r != t, (t, r) is the sorted pair of two uniforms
            assert abs(t[apart].mean().item() - 1 / 3) < 0.01
            assert abs(r[apart].mean().item() - 2 / 3) < 0.01
    with pytest.raises(UsageError, match="interval_fraction"):
        MeanFlow(interval_fraction=0.75)


class Recorder(torch.nn.Module):
    """``u = 10 + label`` whatever x, t and r: shows which velocity the objective used."""

    num_classes, interval = 2, True

    def forward(self, x, t, y=None, r=None):
        return torch.zeros_like(x) + 10.0 + y.to(x.dtype)[:, None]


def test_guided_velocity_mixes_in_the_null_branch_for_labelled_samples():
    path = exact_path("linear")
    z = torch.randn(4, 2, dtype=DTYPE)
    sample = path.sample(z, torch.full((4,), 0.5, dtype=DTYPE))
    v = path.target(sample, "velocity")
    y = torch.tensor([0, 1, 2, 2])  # 2: the null label (label dropout)
    guided = MeanFlow(guidance=3.0).velocity(Recorder(), sample, path, y)
    u_null = 10.0 + 2.0
    torch.testing.assert_close(guided[:2], 3.0 * v[:2] + (1 - 3.0) * u_null)
    torch.testing.assert_close(guided[2:], v[2:])
    assert torch.equal(MeanFlow().velocity(Recorder(), sample, path, y), v)


def test_training_time_guidance_needs_labels_and_label_dropout():
    """Guidance above 1 mixes in the null label's field: refused on a network without labels
    (it would be ignored) and on data without label dropout (the null branch never trains)."""
    path, guided = exact_path("linear"), MeanFlow(guidance=2.0)
    with pytest.raises(UsageError, match=r"guidance 2 mixes .* no labels \(num_classes 0\)"):
        guided.check(MLP(2, hidden=8, depth=1, interval=True), path)
    net = MLP(2, hidden=8, depth=1, num_classes=2, interval=True)
    guided.check(net, path)  # labels: the data decides
    data = ToyDataModule("moons", batch_size=8)
    with pytest.raises(UsageError, match=r"guidance 2 .* p_uncond = 0 \(no label dropout"):
        guided.check_data(data)
    guided.check_data(ToyDataModule("moons", batch_size=8, p_uncond=0.1))
    MeanFlow().check_data(data)  # no guidance: nothing needs the null label
    MeanFlow().check(MLP(2, hidden=8, depth=1, interval=True), path)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_is_exact_with_the_exact_average_velocity(steps):
    path = exact_path("cosine")
    mu, s = torch.tensor([0.5, 1.5], dtype=DTYPE), 0.3
    exact = GaussianAverageVelocity(path, mu, s)

    class ExactField(Field):
        def __init__(self):
            self.path, self.times = path, []

        def average_velocity(self, x, t, r):
            self.times.append((float(t), float(r)))
            return exact(x, t.expand(len(x)), torch.as_tensor(r).expand(len(x)))

    field = ExactField()
    x_0 = torch.randn(32, 2, dtype=DTYPE)
    result = MeanFlowSampler(steps).sample(field, x_0, 0.0, 1.0)
    torch.testing.assert_close(result.x, mu + s * x_0, rtol=1e-12, atol=1e-12)
    assert result.nfe == steps
    expected = [(i / steps, (i + 1) / steps) for i in range(steps)]
    assert [pytest.approx(pair) for pair in expected] == field.times
    assert get_sampler("meanflow", 2).steps == 2 and MeanFlowSampler().steps == 1


def test_the_sampler_refuses_a_plain_velocity_model():
    net = MLP(2, hidden=8, depth=1)
    field = ModelField(net, exact_path("linear"), "velocity")
    with pytest.raises(UsageError, match="average-velocity"):
        MeanFlowSampler(1).sample(field, torch.randn(3, 2))
    with pytest.raises(UsageError, match="interval true"):
        FlowModule(net, exact_path("linear"), MeanFlow())


def test_interval_input_leaves_other_networks_alone():
    plain = MLP(2, hidden=8, depth=1)
    assert not any("interval" in k for k in plain.state_dict())  # old checkpoints still load
    assert not plain.interval
    net = MLP(2, hidden=8, depth=1, interval=True)
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(net(x, t), net(x, t, r=t), rtol=0, atol=0)  # r = None: r = t
    assert not torch.allclose(net(x, t), net(x, t, r=t + 0.5))
    unet = UNet(1, channels=(8, 16), num_res_blocks=1, time_embed_dim=16, interval=True,
                zero_init=False)  # fmt: skip
    assert not any("interval" in k for k in UNet(1, channels=(8, 16)).state_dict())
    images, ts = torch.randn(2, 1, 8, 8), torch.rand(2)
    u, target = meanflow_target(lambda x, t, r: unet(x, t, None, r=r), images, ts, ts + 0.2,
                                torch.randn_like(images))  # fmt: skip
    assert u.shape == target.shape == images.shape
    torch.testing.assert_close(unet(images, ts), unet(images, ts, r=ts), rtol=0, atol=0)


def test_a_short_training_run_samples_the_target_in_one_step():
    """MeanFlow from scratch on one Gaussian N(mu, s^2 I): one jump from noise ``x_0`` lands near
    the exact average velocity's jump, ``mu + s x_0`` (on any Gaussian path).

    The bound follows from what a jump without MeanFlow gives: flow matching's exact field at
    t = 0 on the linear path is ``v(x, 0) = mu - x`` (``E[z | x_0] = mu``), so its one Euler
    jump lands every ``x_0`` on ``mu``, at a mean distance ``s E||x_0|| = s sqrt(pi / 2) = 0.63``
    from the exact jump (``||x_0||`` is chi-distributed with 2 degrees of freedom). The trained
    jump must remove three quarters of that distance. Over 4,000 points the statistic's own
    spread is ~0.005 (``s sqrt(2 - pi / 2) / sqrt(4000)`` for the flow-matching jump), far
    below the bound; what is left is training, run long enough (600 steps, cosine decay to 0)
    that every CPU kernel set (``ATEN_CPU_CAPABILITY`` default, avx2, avx512) and seed lands
    well inside it. Power 0: the plain squared error, whose minimiser is the exact average
    velocity; the adaptive weight converges more slowly on this small network."""
    mu, s = torch.tensor([2.0, -1.0]), 0.5
    torch.manual_seed(0)
    mixture = {"means": [mu.tolist()], "stds": s}
    data = ToyDataModule("mixture", batch_size=256, batches_per_epoch=600, mixture=mixture)
    model = FlowModule(MLP(2, hidden=64, depth=2, num_classes=0, interval=True),
                       exact_path("linear"), MeanFlow(interval_fraction=0.5, power=0.0),
                       MeanFlowSampler(1), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                       lr_schedule="cosine")  # fmt: skip
    L.Trainer(max_steps=600, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, data)  # fmt: skip
    x_0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    x = model.sample(4000, x_0=x_0).x
    distance = (x - (mu + s * x_0)).norm(dim=1).mean()
    flow_matching_jump = s * math.sqrt(math.pi / 2)
    assert distance < flow_matching_jump / 4, distance
    # The objective is CFM's at interval_fraction 0 (r = t everywhere) with power 0.
    sample = model.path.sample(torch.randn(16, 2), torch.rand(16))
    cfm = ConditionalFlowMatching().loss(model.net, sample, model.path)
    mf = MeanFlow(interval_fraction=0.0, power=0.0).loss(model.net, sample, model.path)
    torch.testing.assert_close(mf, cfm)


def test_toy_meanflow_config_trains_and_evaluates_at_one_and_two_steps(tmp_path, run_cli):
    root = tmp_path / "run"
    code, _, err = run_cli("fit", "--config", "toy_meanflow.yaml", "--trainer.default_root_dir",
                           root, "--trainer.logger", "false", "--model.net.init_args.hidden", "32",
                           "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                           "--data.init_args.batch_size", "64", "--validation.num_samples",
                           "50")  # fmt: skip
    assert code == 0, err
    ckpt = root / "checkpoints" / "last.ckpt"
    code, stdout, err = run_cli("evaluate", "--ckpt", ckpt, "--sampler", "meanflow,euler",
                                "--steps", "1,2", "--num-samples", "100", "--nll-samples", "50",
                                "--nll-steps", "2", "--wandb", "false")  # fmt: skip
    assert code == 0, err
    report = json.loads((root / "eval" / "seed0" / "metrics.json").read_text())
    assert [(r["name"], r["nfe"]) for r in report["rows"]] == [
        ("meanflow", 1), ("meanflow", 2), ("euler", 1), ("euler", 2)]  # fmt: skip
    assert report["likelihood"] is not None and report["straightness"] is not None
    code, stdout, err = run_cli("sample", "--ckpt", ckpt, "--num-samples", "20", "--out",
                                tmp_path / "s")  # fmt: skip
    assert code == 0, err
    assert "MeanFlowSampler(steps=1" in stdout and "NFE 1;" in stdout
