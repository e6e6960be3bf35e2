"""Configuration: a dataclass with working defaults is the single source of every option.

Each field becomes a command-line flag whose ``--help`` line is the field's ``help`` metadata::

    @dataclass
    class Config(QuickConfig):
        steps: int = field(default=2000, metadata={"help": "optimizer steps"})
        QUICK = {"steps": 20}                # what --quick (or MINILLM_QUICK=1) changes

    config = parse_config(Config, description="Train a thing.")

``--quick`` switches to the tiny configuration that tests and CI use; flags given explicitly
still win over it. Notebooks, which have no command line, get the same switch from the
environment variable ``MINILLM_QUICK=1`` through :func:`config_for_notebook`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, ClassVar, TypeVar

QUICK_ENV = "MINILLM_QUICK"

C = TypeVar("C")


def quick_requested() -> bool:
    """True when the environment asks for the quick configuration (``MINILLM_QUICK=1``)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class QuickConfig:
    """Base for chapter configurations: a ``quick`` flag plus the overrides it applies."""

    quick: bool = dataclasses.field(
        default=False,
        metadata={"help": "tiny configuration that finishes in seconds on a CPU (tests and CI use it)"},
    )
    QUICK: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with one clear sentence when a value is impossible."""


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, hint) -> None:
    name = "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
    help_text = field.metadata.get("help", "")
    if default not in ("", None) and "default" not in help_text:
        help_text = f"{help_text} (default: {default})"
    tp, optional = _unwrap_optional(hint)
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
    if tp is bool:
        parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text, **kwargs)
        return
    if typing.get_origin(tp) is typing.Literal:
        choices = list(typing.get_args(tp))
        parser.add_argument(name, choices=choices, type=type(choices[0]), help=help_text, **kwargs)
        return
    if typing.get_origin(tp) in (tuple, list):
        item_types = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_type = item_types[0]
        fixed_length = typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp)
        nargs = len(item_types) if fixed_length else "+"
        parser.add_argument(name, type=item_type, nargs=nargs, metavar=field.name.upper(), help=help_text, **kwargs)
        return
    if tp not in (int, float, str):
        raise TypeError(f"config field {field.name!r} has unsupported type {tp!r}")
    convert = tp
    if optional:
        def convert(text, tp=tp):
            return None if text.lower() == "none" else tp(text)
    metavar = {int: "N", float: "X", str: "TEXT"}[tp]
    parser.add_argument(name, type=convert, metavar=metavar, help=help_text, **kwargs)


def _value_fits(value: Any, hint) -> bool:
    """Does a JSON value fit a field's type hint (int, float, bool, str, Literal[...], or Optional of one)?"""
    hint, optional = _unwrap_optional(hint)
    if value is None:
        return optional
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # other types: the dataclass's own checks decide


def dataclass_from_dict(cls: type[C], values: dict, source: str = "the configuration") -> C:
    """``cls(**values)`` for a dict read from a file (a run's config.json), keeping only the fields ``cls``
    knows, after checking each value's type against the field's (``"n_layer": "two"`` is refused here, with
    one sentence naming ``source``, not deep inside a model's constructor); ``cls``'s own ``__post_init__``
    then checks ranges. Raises ``ValueError``."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} is not a JSON object")
    hints = typing.get_type_hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in known and not _value_fits(value, hints[name]):
            hint = _unwrap_optional(hints[name])[0]
            expected = (f"one of {', '.join(map(repr, typing.get_args(hint)))}" if typing.get_origin(hint) is typing.Literal
                        else f"a valid {getattr(hint, '__name__', hint)}")
            raise ValueError(f"{source} has {name} = {value!r}, which is not {expected}")
    return cls(**{name: value for name, value in values.items() if name in known})


def config_parser(cls: type, description: str | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls``."""
    parser = parser or argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n")[0]
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            _add_field(parser, field, hints[field.name])
    return parser


def build_config(cls: type[C], overrides: dict[str, Any] | None = None, quick: bool | None = None) -> C:
    """Make a config: defaults, then the class's QUICK values if quick, then explicit overrides."""
    overrides = dict(overrides or {})
    if quick is None:
        quick = bool(overrides.get("quick", False))
    values: dict[str, Any] = {}
    if quick:
        values.update(getattr(cls, "QUICK", {}))
        values["quick"] = True
    values.update(overrides)
    return cls(**values)


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse the command line into ``cls``; a bad value exits with one sentence (argparse's usage error)."""
    parser = config_parser(cls, description)
    namespace = parser.parse_args(argv)
    overrides = vars(namespace)
    hints = typing.get_type_hints(cls)
    for name, value in overrides.items():
        if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[name])[0]) is tuple:
            overrides[name] = tuple(value)
    quick = overrides.get("quick", False) or quick_requested()
    try:
        config = build_config(cls, overrides, quick=quick)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits
    if isinstance(getattr(config, "device", None), str):  # a device this machine lacks is a usage error too
        from minillm import MinillmError
        from minillm.device import pick_device

        try:
            pick_device(config.device)
        except MinillmError as error:
            parser.error(str(error))
    return config


def run_chapter(main: Callable[[C], object], cls: type[C], argv: list[str] | None = None) -> None:
    """A chapter script's entry point: parse the command line into ``cls`` and run ``main(config)``.

    A user's mistake found while running (a missing or damaged file: :class:`minillm.MinillmError`)
    prints one ``error:`` line and exits with status 2; Ctrl-C exits with 130. Files already saved stay.
    """
    from minillm import MinillmError, interrupted_message

    config = parse_config(cls, argv)
    try:
        main(config)
    except MinillmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print(interrupted_message(interrupt), file=sys.stderr)
        sys.exit(130)


def config_for_notebook(cls: type[C], **overrides: Any) -> C:
    """The config a notebook uses: quick when ``MINILLM_QUICK=1`` is set (as the test suite does)."""
    return build_config(cls, overrides, quick=quick_requested())
