"""What the user reads: bad input as one line, Lightning's information on stdout, noise quieted."""

from __future__ import annotations

import logging
import re
import sys
import warnings


def innermost_reason(err: BaseException) -> str:
    """The reason jsonargparse nests under "Errors:" (one line per union member), else the text.

    A member that merely does not match (None, or an alias ``Literal`` when a class was given)
    gives way to one whose constructor said what is wrong.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [
        line[2:]
        for line in lines
        if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    specific = [r for r in reasons if not r.startswith("Expected a typing.Literal")]
    reasons = specific or reasons
    return reasons[0] if reasons else (lines[0] if lines else type(err).__name__)


def argument_error(err: BaseException) -> str:
    """jsonargparse's multi-line report of a bad value as one line: the key, why, what came."""
    text = str(err)
    key = re.match(r'Parser key "([^"]+)":', text)
    if not key:
        return one_line(text)
    if "Errors:" in text:  # a union type: the reason of the member that fits, and the value
        reason = innermost_reason(err)
        given = re.search(r"Given value: (.*)$", text, re.S)
        given = given[1].strip() if given else None
    else:  # a plain type: "Not of type PositiveInt: 0 does not conform to restriction v>0"
        reason, given = one_line(text[key.end() :]), None
    restriction = re.search(
        r"Not of type (Positive|NonNegative)(Int|Float): (?:(\S+) )?does not conform to "
        r"restriction v>=?0",
        reason,
    )
    if restriction:
        sign = "positive" if restriction[1] == "Positive" else "non-negative"
        reason = f"expected a {sign} {'integer' if restriction[2] == 'Int' else 'number'}"
        given = given or restriction[3]
    return f"{key[1]}: {reason}" + (f", got {given}" if given else "")


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


# Lightning warnings that say nothing to a flowdiff user: the toy stream defines __len__ for the
# progress bar and uses no workers; the pytree deprecation is Lightning's own.
QUIET = [
    r".*`IterableDataset` has `__len__` defined",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*skip_none parameter was deprecated",
    r"LightningCLI's args parameter is intended",  # main() passes sys.argv on, resolved
    # Under DDP: the sample metrics are computed on rank 0 alone and logged with rank_zero_only.
    r"It is recommended to use `self.log\('(val|test)/(w2|mmd)', ..., sync_dist=True\)`",
    r'.*ckpt_path="last"\) is set, but there is no last checkpoint',  # said in flowdiff's words
    # Lightning Fabric's all_gather (evaluate across ranks) calls a torch function since deprecated.
    r"torch.distributed.nn.functional.all_gather is deprecated",
    # evaluate's KID keeps the features of one reference and one sample set: 128 numbers an image.
    r"Metric `Kernel Inception Distance` will save all extracted features in buffer",
]


class _StandardStreams(logging.StreamHandler):
    """Information on stdout, warnings and errors on stderr: the streams of the moment (not those
    of import time), so that stderr holds only problems and a bad input is one line there."""

    _level_now = logging.INFO

    @property
    def stream(self):
        return sys.stdout if self._level_now < logging.WARNING else sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self._level_now = record.levelno
        super().emit(record)


def lightning_info_to_stdout() -> None:
    """Lightning logs its information (seed, devices, model summary, tips) to stderr through the
    handlers it adds when nothing else configures logging; flowdiff prints it on stdout."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
                replacement = _StandardStreams()
                replacement.setLevel(handler.level)
                replacement.setFormatter(handler.formatter)
                logger.addHandler(replacement)


def quiet_warnings() -> None:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
