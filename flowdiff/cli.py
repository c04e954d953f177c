"""The ``flowdiff`` command: LightningCLI for fit/validate/test/predict, plus ``sample`` and
``evaluate``; one error line for bad input. Run directories are :mod:`flowdiff.runs`."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flowdiff.callbacks import EMA, NonFiniteGuard, Throughput, TrainingError, ValidationSamples
from flowdiff.checkpoint import RunCheckpoint, SafeCheckpointIO, read_checkpoint
from flowdiff.data.base import FlowDataModule
from flowdiff.messages import (
    argument_error,
    innermost_reason,
    lightning_info_to_stdout,
    one_line,
    quiet_warnings,
)
from flowdiff.module import FlowModule
from flowdiff.runs import (
    SaveFitConfig,
    check_run_dir,
    check_writable,
    clear_run_dir,
    last_checkpoint,
    wandb_logger,
)
from flowdiff.speed import FlowTrainer, choose, device_kind
from flowdiff.utils import (
    UsageError,
    keep_freed_memory,
    skip_nvml_probe_without_driver,
    stable_compile_cache,
)

CONFIG_DIR = Path(__file__).parent / "configs"
EXTRA_SUBCOMMANDS = {
    "sample": "draw samples from a checkpoint",
    "evaluate": "metrics of a checkpoint over samplers, steps and guidance",
    "reflow": "couplings (noise, sample) of a teacher, for rectified-flow training",
}


def resolve_config(value: str) -> str:
    """A config path as given, or the shipped config of that name when no such file exists here.

    ``--config toy.yaml`` and ``--config configs/toy.yaml`` work from any directory.
    """
    if os.path.exists(value) or value.lstrip().startswith(("{", "[")) or "\n" in value:
        return value
    shipped = CONFIG_DIR / Path(value).name
    if shipped.is_file():
        return str(shipped)
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise UsageError(f"config file {value!r} not found (shipped configs: {', '.join(names)})")


def resolve_config_args(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


class FlowdiffCLI(LightningCLI):
    """LightningCLI with flowdiff's run-directory, checkpoint, EMA and W&B conventions."""

    def __init__(self, *args, **kwargs):
        # `--config toy.yaml` also names the shipped configs, from any directory.
        argv = kwargs.get("args")
        kwargs["args"] = resolve_config_args(sys.argv[1:] if argv is None else list(argv))
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # guarded by check_run_dir
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("datamodule_class", FlowDataModule)
        kwargs.setdefault("trainer_class", FlowTrainer)  # trainer.precision takes auto
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "exit_on_error": False,
                "prog": "flowdiff",
                "description": "Train, sample and study flow-matching and diffusion models.",
                "epilog": "flowdiff's own commands (no --config needed): "
                + "; ".join(
                    f"`flowdiff {name}`: {text}" for name, text in EXTRA_SUBCOMMANDS.items()
                )
                + ". Each has --help.",
            },
        )
        kwargs.setdefault("save_config_callback", SaveFitConfig)
        kwargs.setdefault(
            "trainer_defaults",
            {"default_root_dir": "runs/default", "enable_progress_bar": sys.stderr.isatty()},
        )
        super().__init__(FlowModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Train into a run directory that already holds a run, deleting its checkpoints.",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="Start from the network weights of this flowdiff checkpoint (e.g. the teacher "
            "of a reflow); the optimizer starts afresh. --ckpt_path (resuming) takes precedence.",
        )
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(ValidationSamples, "validation")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # last.ckpt at every validation, when training ends, and at least every minute (a run
        # killed at any moment loses at most about a minute).
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.train_time_interval": timedelta(minutes=1),
            }
        )
        parser.link_arguments(
            "trainer.default_root_dir",
            "checkpoint.dirpath",
            compute_fn=lambda root: os.path.join(root, "checkpoints"),
        )
        parser.link_arguments("data.data_shape", "model.data_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads the checkpoint's hyperparameters into the config next. First make sure
        # that the checkpoint exists and is a flowdiff checkpoint, read as data: a bad or unsafe
        # one is one clear line here, before anything is built or written.
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path == "last":
            folder = config.checkpoint.dirpath or os.path.join(
                config.trainer.default_root_dir, "checkpoints"
            )
            ckpt_path = last_checkpoint(folder)
            if ckpt_path is None and subcommand == "fit":
                # Resuming a run killed before its first checkpoint: it starts over.
                print(f"flowdiff: no checkpoint in {folder} yet: training starts at step 0")
            elif ckpt_path is None:
                raise UsageError(f"--ckpt_path last: no checkpoint in {folder}")
        if ckpt_path and ckpt_path not in ("best", "hpc"):
            read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        size_network(config)
        # precision and compile: auto resolved once, so the saved config and the checkpoint
        # record what ran (flowdiff.speed).
        speed = choose(
            config.trainer.precision, config.model.compile, device_kind(config.trainer.accelerator)
        )
        config.trainer.precision, config.model.compile = speed.precision, speed.compile
        if rank_zero_only.rank == 0:
            print(speed.line())
        if self.subcommand == "fit":
            config = self.config.fit
            max_steps = config.trainer.max_steps
            if max_steps is not None and (max_steps == 0 or max_steps < -1):
                raise UsageError(
                    f"trainer.max_steps must be a positive integer (or -1: no limit), got "
                    f"{max_steps}"
                )
            checkpoint = config.checkpoint
            if checkpoint.every_n_train_steps or checkpoint.every_n_epochs:
                # Lightning takes one trigger: a step or epoch interval replaces the time one.
                checkpoint.train_time_interval = None
            every = config.trainer.log_every_n_steps
            if every is not None and every < 1:
                raise UsageError(f"trainer.log_every_n_steps must be positive, got {every}")
            if config.init_from:
                read_checkpoint(config.init_from)  # one clear line now, not after the setup
            check_run_dir(config.trainer.default_root_dir, config.ckpt_path, config.overwrite)
            check_writable(config.trainer.default_root_dir)

    def instantiate_classes(self) -> None:
        # Constructors validate their arguments; a failure here is a bad config, said in one line.
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except (ValueError, TypeError) as err:
            raise UsageError(f"invalid configuration: {innermost_reason(err)}") from err

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True) and not config.trainer.get("fast_dev_run"):
            kwargs["logger"] = wandb_logger(config.trainer.default_root_dir)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.loggers and self.subcommand == "fit":
            # W&B shows the learning rate and samples/s (images/s, points/s) beside the loss.
            from lightning.pytorch.callbacks import LearningRateMonitor

            trainer.callbacks[:0] = [LearningRateMonitor("step"), Throughput()]
        # Lightning's stock checkpoint I/O (not one the user chose through --trainer.plugins or
        # the strategy) becomes the safe one: atomic writes, weights_only reads.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        # Under DDP every rank runs this CLI (Lightning's launcher re-runs the command line;
        # torchrun and SLURM start each rank themselves), each before the ranks connect, and
        # nothing is written into the run directory until all have. Global rank 0 alone clears it.
        for callback in self.trainer.callbacks:
            if isinstance(callback, ValidationSamples):
                callback.check(self.model, self.datamodule)
        self.model.check_data(self.datamodule)  # before anything is written
        config = self.config.fit
        if config.init_from and config.ckpt_path is None:
            self.model.init_weights(read_checkpoint(config.init_from), config.init_from)
        if config.overwrite and config.ckpt_path is None and self.trainer.is_global_zero:
            clear_run_dir(config.trainer.default_root_dir)

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:  # one report, and only rank 0 holds the W&B run
            return
        root = self.trainer.default_root_dir
        print(
            f"flowdiff: run directory {root} (checkpoints in {os.path.join(root, 'checkpoints')})"
        )
        from flowdiff.wandb_mode import print_sync_hint

        print_sync_hint(self.trainer.logger)


def size_network(config) -> None:
    """Give the network the sizes the data fixes (channels, image size, dimension, classes) before
    anything is built, so that no config writes the same number twice
    (:func:`flowdiff.nets.base.size_from_data`). The datamodule is built here to ask it, and
    again by Lightning; its constructor is cheap (it lists or memory-maps files, never decodes)."""
    from flowdiff.config import build
    from flowdiff.nets.base import size_from_data

    data = config.get("data")
    net = config.get("model") and config.model.get("net")
    if data is None or net is None or not isinstance(data.get("class_path"), str):
        return
    init_args = data.get("init_args")
    init_args = init_args.as_dict() if init_args is not None else {}
    datamodule = build({"class_path": data.class_path, "init_args": init_args})
    size_from_data(net, datamodule.network_sizes(), datamodule.num_classes)
    from flowdiff.text.sizing import size_text

    size_text(config.model, datamodule)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowdiff`` console script."""
    quiet_warnings()
    lightning_info_to_stdout()
    keep_freed_memory()
    skip_nvml_probe_without_driver()  # after Lightning's import has set it
    stable_compile_cache()  # before anything compiles
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLOWDIFF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        if argv and argv[0] == "sample":
            from flowdiff.sample import sample_main

            sample_main(argv[1:])
        elif argv and argv[0] == "evaluate":
            from flowdiff.evaluate.command import evaluate_main

            evaluate_main(argv[1:])
        elif argv and argv[0] == "reflow":
            from flowdiff.reflow import reflow_main

            reflow_main(argv[1:])
        else:
            FlowdiffCLI(args=argv)
    except (UsageError, ArgumentError, MisconfigurationException) as err:
        # MisconfigurationException: a setting Lightning itself refuses, said in its words.
        if debug:
            raise
        message = argument_error(err) if isinstance(err, ArgumentError) else one_line(err)
        print(f"flowdiff: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as err:  # training ran and stopped (non-finite loss, disk full, ...)
        if debug:
            raise
        print(f"flowdiff: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
