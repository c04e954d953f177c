"""Components as configs: ``{"class_path": ..., "init_args": {...}}``, the form YAML files use.

One naming system for every part (networks, schedules, objectives, samplers, optimizers, data):

- :func:`resolve` finds a class from a short alias (``"heun"``), its class name (``"HeunSampler"``)
  or a dotted class path (``"mypackage.samplers.MySampler"``).
- :class:`Recorded` makes an object remember the arguments it was built with, so that
  :func:`describe` can write it down as a config: a model built in plain Python gets a checkpoint
  as self-describing as one trained through the command line.
- :func:`build` turns a config back into an object.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from flowdiff.utils import UsageError


class Recorded:
    """Remembers the arguments of its construction in ``init_args`` (defaults filled in)."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        arguments: dict = {}
        if cls.__init__ is not object.__init__:
            signature = inspect.signature(cls.__init__)
            try:
                bound = signature.bind(None, *args, **kwargs)
            except TypeError:
                return self  # __init__ raises the same error, in its own words
            bound.apply_defaults()
            for name, value in list(bound.arguments.items())[1:]:  # without self
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
        object.__setattr__(self, "_init_args", arguments)
        return self

    @property
    def init_args(self) -> dict:
        return dict(getattr(self, "_init_args", {}))


def call_repr(obj: Recorded) -> str:
    """``Name(arg=value, ...)`` from a Recorded object's arguments: a ``__repr__`` to assign."""
    args = ", ".join(f"{k}={v!r}" for k, v in obj.init_args.items())
    return f"{type(obj).__name__}({args})"


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(value: Any) -> Any:
    """A plain-data description of ``value``: configs for objects, lists and dicts recursively.

    Objects must be :class:`Recorded` (or classes, or ``functools.partial`` of a class, as
    optimizers are given); anything else that is not plain data cannot be written down.
    """
    import functools

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, Recorded):
        return {"class_path": class_path(type(value)), "init_args": describe(value.init_args)}
    if isinstance(value, type):
        return {"class_path": class_path(value)}
    if isinstance(value, functools.partial):
        # partial(Adam, lr=...), or jsonargparse's partial(instantiator, ..., Adam, lr=...)
        cls = value.func if not value.args else value.args[-1]
        if isinstance(cls, type):
            return {"class_path": class_path(cls), "init_args": describe(value.keywords)}
    raise UsageError(
        f"cannot write {type(value).__name__} into a checkpoint: give it as a config "
        "({class_path: ..., init_args: ...}) or make its class a flowdiff.config.Recorded"
    )


def resolve(name: str, base: type, aliases: Mapping[str, type] | None = None) -> type:
    """The subclass of ``base`` that ``name`` means: an alias, a class name, or a class path."""
    aliases = aliases or {}
    if name in aliases:
        return aliases[name]
    by_name = {cls.__name__: cls for cls in _subclasses(base)}
    if name in by_name:
        return by_name[name]
    if "." in name:
        try:
            cls = import_class(name)
        except UsageError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, base):
            return cls
    known = sorted(aliases) or sorted(by_name)
    raise UsageError(
        f"unknown {base.__name__.lower()} {name!r}; expected one of {known} or a class path"
    )


def _subclasses(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_subclasses(cls)]
    return found


def build(config: Any, *args, **kwargs) -> Any:
    """The object a config describes; ``args``/``kwargs`` come first (e.g. the parameters of an
    optimizer). A config without init_args builds with defaults; a class is called as it is."""
    if callable(config):
        return config(*args, **kwargs)
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise UsageError(f"not a component config (no class_path): {config!r}")
    cls = import_class(config["class_path"])
    return cls(*args, **{**dict(config.get("init_args") or {}), **kwargs})


def import_class(path: str) -> Any:
    """The object ``package.module.Name`` names."""
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(f"cannot import {path!r}: {err}") from err
