"""The LightningModule: wires a network, a path and an objective. It holds no formula.

Lightning's own loop does the rest (automatic optimization, gradient clipping and accumulation,
precision, the learning-rate schedule); validation pictures, EMA and the non-finite guard are
callbacks (:mod:`flowdiff.callbacks`).
"""

from __future__ import annotations

import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowdiff.config import build, describe
from flowdiff.couplings import Coupling, get_coupling
from flowdiff.generation import Generation
from flowdiff.inference import InferenceNetwork
from flowdiff.objectives import Objective
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import EulerSampler, Sampler
from flowdiff.speed import choose, device_kind
from flowdiff.text import TextCondition, TextEncoder, check_text_network
from flowdiff.utils import UsageError

# The cosine learning-rate schedule moves every 10 optimizer steps: a scheduler step costs ~3% of
# a small model's step, and a rate constant over 10 steps changes nothing.
LR_UPDATE_EVERY = 10


class FlowModule(Generation, L.LightningModule):
    """Flow matching / score matching on a Gaussian probability path.

    Args:
        net: ``forward(x, t, y=None) -> tensor like x`` (:class:`flowdiff.nets.base.Network`).
        path: the Gaussian conditional probability path.
        objective: CFM or CSM; it says what the network predicts.
        sampler: how validation draws samples, and where ``flowdiff sample`` and ``evaluate``
            start (their flags override its arguments).
        optimizer: optimizer factory (a class path in YAML); Adam by default.
        lr_schedule: ``constant``, or ``cosine``: decay the learning rate to 0 over the run's
            optimizer steps (``trainer.max_steps``, or the epochs' batches).
        coupling: how training pairs noise with data (:mod:`flowdiff.couplings`):
            ``independent`` (the default), ``ot`` (exact minibatch optimal transport) or
            ``ot-sinkhorn`` (entropic), within each label for a conditional network; per batch,
            so per rank under DDP; ``stored``: the noise each data point was stored with (the
            couplings of ``flowdiff reflow``, :class:`flowdiff.data.reflow.ReflowDataModule`).
        data_shape: shape of one sample, e.g. ``[2]``; from the datamodule when not given.
        num_classes: number of labels in the data (0: unlabelled); from the datamodule too.
        text_encoder: for captioned data, how captions become the network's condition
            (:mod:`flowdiff.text`); the CLI gives captioned data the default
            :class:`flowdiff.text.TrainedTextEncoder`, trained with the network (a frozen one
            is not). The network's ``text_dim`` matches its width.
        compile: train the network compiled with ``torch.compile`` (the module's forward is
            compiled in place: the weights, the EMA and checkpoints keep their names and load
            without it). The first step's time, compilation included, is printed. ``auto``:
            when training starts, by the rule of :mod:`flowdiff.speed` for the trainer's
            precision and device (on with bf16 on an AMX CPU); the checkpoint records the
            outcome (``checkpoint["compile"]``).

    Built in plain Python with flowdiff's components (or any :class:`flowdiff.config.Recorded`),
    it writes checkpoints that ``flowdiff sample`` and ``evaluate`` rebuild, as the CLI's do.
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianConditionalPath,
        objective: Objective,
        sampler: Sampler | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        coupling: Literal["independent", "ot", "ot-sinkhorn", "stored"] | Coupling = "independent",
        data_shape: list[int] | None = None,
        num_classes: int = 0,
        text_encoder: TextEncoder | None = None,
        compile: bool | Literal["auto"] = "auto",
    ):
        super().__init__()
        self.save_hyperparameters()
        # The checkpoint holds configs, never objects: under the CLI the hyperparameters are its
        # config already; objects built in Python describe themselves (flowdiff.config).
        for key, value in list(self.hparams.items()):
            try:
                self.hparams[key] = describe(value)
            except UsageError:
                pass  # said when a checkpoint is written (on_save_checkpoint)
        classes = getattr(net, "num_classes", 0)
        if classes and num_classes and classes != num_classes:
            raise UsageError(
                f"the network has {classes} classes but the data has {num_classes}; set "
                f"model.net.init_args.num_classes to {num_classes} (or 0 for no labels)"
            )
        check_text_network(net, text_encoder)
        if lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.coupling = get_coupling(coupling)
        objective.check(net, path, self.coupling)
        self.net, self.path, self.objective = net, path, objective
        self.text_encoder = text_encoder
        if text_encoder is not None and not text_encoder.trainable:
            text_encoder.requires_grad_(False)
        self.sampler = sampler if sampler is not None else EulerSampler(100)
        self.lr_schedule = lr_schedule
        self.data_shape = list(data_shape) if data_shape is not None else None
        self.num_classes = num_classes
        self.data_info: dict = {}  # the datamodule's description, kept in the checkpoint
        self.compile_net, self._first_step_start, self._compile_said = compile, None, False
        # The network as sampling runs it (flowdiff.inference; None: self.net as it is).
        self.inference: InferenceNetwork | None = None
        self.net.to(memory_format=self.memory_format)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout the network asks its weights and inputs in (the Network contract's optional
        ``memory_format``; contiguous when it states none)."""
        return getattr(self.net, "memory_format", torch.contiguous_format)

    @property
    def conditional(self) -> bool:
        """Whether the network takes a condition, labels or text (and so has a null one for
        guidance)."""
        return bool(getattr(self.net, "num_classes", 0)) or self.reads_text

    @property
    def reads_text(self) -> bool:
        """Whether the network is conditioned on text (captions, prompts)."""
        return self.text_encoder is not None

    def condition(self, y) -> Tensor | TextCondition | None:
        """What the network reads of a batch's ``y``: labels as they are, captions (a list of
        strings, ``""`` the null caption) encoded; None for an unconditional network."""
        if self.text_encoder is not None:
            return self.text_encoder(list(y))
        return y if self.conditional else None

    @property
    def interval(self) -> bool:
        """Whether the network predicts average velocities over intervals (MeanFlow)."""
        return bool(getattr(self.net, "interval", False))

    @property
    def p_uncond(self) -> float:
        """The label dropout the network was trained with (0: it never learned the null label)."""
        return float(self.data_info.get("p_uncond", 0.0))

    # -- the data, recorded in the checkpoint ---------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        describe_data = getattr(datamodule, "describe", None)
        self.check_data(datamodule)
        if self.text_encoder is not None and getattr(datamodule, "captioned", False):
            self.text_encoder.prepare(datamodule.captions())  # a frozen encoder's cache
        if callable(describe_data):
            self.data_info = describe_data()
            if self.data_shape is None:
                self.data_shape = list(self.data_info["data_shape"])

    def check_data(self, datamodule) -> None:
        """Refuse data this model cannot train on: the ``stored`` coupling needs stored noise."""
        if self.coupling.needs_stored and not getattr(datamodule, "stores_noise", False):
            raise UsageError(
                "model.coupling stored needs data that stores the noise of each sample: "
                "flowdiff reflow's output, with data.class_path "
                "flowdiff.data.reflow.ReflowDataModule"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hparams = dict(self.hparams)
        for part in ("net", "path", "objective"):  # Lightning drops what it cannot pickle
            hparams.setdefault(part, getattr(self, part))
        checkpoint["hyper_parameters"] = describe(hparams)  # data, never objects
        checkpoint["data"] = {**self.data_info, "data_shape": self.data_shape}
        if self._trainer is not None:  # what the run trained with (flowdiff.speed)
            checkpoint["precision"] = str(self._trainer.precision)
        if self.compile_net != "auto":
            checkpoint["compile"] = bool(self.compile_net)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.data_info = dict(checkpoint.get("data") or {})
        if self.data_shape is None and self.data_info.get("data_shape") is not None:
            self.data_shape = list(self.data_info["data_shape"])

    def init_weights(self, checkpoint: dict, name: str = "the checkpoint") -> None:
        """Start from the network weights of a flowdiff ``checkpoint`` (its EMA weights when it
        kept them: they are its ``state_dict``); a network of another shape is a UsageError."""
        state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        try:
            self.net.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise UsageError(
                f"--init_from {name}: its network does not fit this one ({' '.join(first[:2])})"
            ) from err

    # -- training -------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.compile_net == "auto":
            precision = str(self.trainer.precision)
            self.compile_net = choose(precision, "auto", device_kind(self.device)).compile
        if self.compile_net:  # after the EMA callback has copied the module (setup)
            self.net.compile()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.compile_net and self._first_step_start is None:
            self._first_step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.compile_net and not self._compile_said:
            self._compile_said = True
            seconds = time.perf_counter() - self._first_step_start
            if self.trainer.is_global_zero:
                print(f"flowdiff: network compiled in {seconds:.1f} s (the first training batch)")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)

    def loss(
        self,
        z: Tensor,
        y: Tensor | list[str],
        generator: torch.Generator | None = None,
        x_0: Tensor | None = None,
    ) -> Tensor:
        """The objective's mean over a batch of data ``z`` with labels ``y`` (and the noise
        ``x_0`` the data stored with it, which the ``stored`` coupling uses)."""
        z = z.contiguous(memory_format=self.memory_format)
        y = self.condition(y)
        t = self.path.sample_time(z.shape[0], z.device, z.dtype, generator)
        eps = torch.empty_like(z).normal_(generator=generator)  # keeps z's memory format
        labels = y if isinstance(y, Tensor) else None  # OT couples within labels, not captions
        eps = self.coupling(eps, z, labels, generator, stored=x_0)  # x_0 for z
        sample = self.path.sample(z, t, eps)
        return self.objective.loss(self.net, sample, self.path, y, generator).mean()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = self.loss(*batch[:2], x_0=batch[2] if len(batch) > 2 else None)
        # Logged at Lightning's logging interval only: every self.log moves the logged results
        # to the device again, ~1.5 ms a step here (toy: 15% of a step; MNIST: 0.3%).
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        z, y = batch[:2]
        # A fixed generator: the validation loss is comparable from one epoch to the next.
        generator = torch.Generator(z.device).manual_seed(0)
        loss = self.loss(z, y, generator, x_0=batch[2] if len(batch) > 2 else None)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(z))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        optimizer = build(self.hparams["optimizer"], self.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        every = LR_UPDATE_EVERY * self.trainer.accumulate_grad_batches  # counted in batches
        total = max(int(self.trainer.estimated_stepping_batches) // LR_UPDATE_EVERY, 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        schedule = {"scheduler": scheduler, "interval": "step", "frequency": every}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
