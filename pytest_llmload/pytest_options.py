"""The registry of options (:mod:`.options`) given to pytest: command-line options and ini keys,
their validation (a usage error naming the option), and the raw values one run got.

Output paths are fixed here, at configure time, as ``--junitxml``'s is: a test that changes the
working directory must not move them, and a report that cannot be written must not be found
out after the whole run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .errors import ConfigError
from .options import (
    BY_KEY,
    ENV_API_KEY,
    NATIVE_BOOL,
    NATIVE_INT,
    NATIVE_NUMBER,
    OPTIONS,
    OUTPUT_DIR_KEYS,
    OUTPUT_KEYS,
    PLOT_KEYS,
    Option,
)

MSG_OUTPUT_PATH = (
    "{option}: expected the path of a file pytest-llmload can write, got {value!r}, {why}."
)

MSG_OUTPUT_DIR = (
    "{option}: expected a folder pytest-llmload can write files into, got {value!r}, {why}."
)

#: Raw values by option key; None means "not given".
RawValues = dict[str, object | None]


def _validator(o: Option) -> Callable[[str], str]:
    """argparse ``type=``: validate now (a usage error naming the option), keep the text."""

    def check(text: str) -> str:
        if o.parse is not None:
            try:
                o.parse(text, o.cli)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
        return text

    check.__name__ = f"parse_{o.key}"
    return check


def _pytest_version() -> tuple[int, ...]:
    return tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit())


def _ini_type(o: Option) -> Any:
    """Scalar ini keys are read raw and checked by our own parsers, so a bad value is a sentence
    naming the key (pytest's 'bool' type would say only "invalid truth value 'maybe'").
    From pytest 9.2 a union type also lets ``[tool.pytest]`` hold native TOML numbers and
    booleans (``llm_rps = 10``), which plain 'string' refuses there."""
    if o.repeat:
        return "linelist"
    if _pytest_version() < (9, 2) or o.native is None:
        return "string"
    return {NATIVE_BOOL: str | bool, NATIVE_INT: str | int, NATIVE_NUMBER: str | int | float}[
        o.native
    ]


def add_options(parser: pytest.Parser) -> None:
    """Every option of the registry, with its ini twin."""
    group = parser.getgroup("llmload", "LLM load testing (pytest-llmload)")
    for o in OPTIONS:
        if o.flag:
            group.addoption(o.cli, dest=o.dest, action="store_true", default=None, help=o.help)
        elif o.const is not None:
            group.addoption(o.cli, dest=o.dest, metavar=o.metavar, type=_validator(o), nargs="?",
                            const=o.const, default=None, help=o.help)
        else:
            group.addoption(o.cli, dest=o.dest, metavar=o.metavar, type=_validator(o),
                            action="append" if o.repeat else "store", default=None, help=o.help)
        parser.addini(o.dest, o.help, type=_ini_type(o), default=[] if o.repeat else None)


def read_options(config: pytest.Config) -> tuple[RawValues, RawValues]:
    """``(cli, ini)``: the raw values of every option, ini values checked (argparse never saw
    them), output paths made absolute and checked, the key taken from the environment when no
    option gives one."""
    cli: RawValues = {}
    ini: RawValues = {}
    for o in OPTIONS:
        cli[o.key] = config.getoption(o.dest)
        value: object | None = config.getini(o.dest)
        ini[o.key] = None if value is None or (isinstance(value, str | list) and not value) else value
    for key, value in ini.items():
        parse = BY_KEY[key].parse
        if value is not None and parse is not None and key != "dataset":  # dataset: below
            try:
                parse(value, BY_KEY[key].ini_label)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
    # command-line paths are relative to where pytest was started, ini paths to the ini file
    # (as pytest's own 'paths' ini type)
    ini_dir = config.inipath.parent if config.inipath else config.invocation_params.dir
    for key in (*OUTPUT_KEYS, *OUTPUT_DIR_KEYS):
        o = BY_KEY[key]
        check = output_dir if key in OUTPUT_DIR_KEYS else output_path
        for layer, base, name in ((cli, config.invocation_params.dir, o.cli),
                                  (ini, ini_dir, o.ini_label)):
            if layer.get(key) is not None:
                layer[key] = check(str(layer[key]), base, name)
    for key in PLOT_KEYS:
        if cli.get(key) is not None or ini.get(key) is not None:
            from .render import require_plotting

            try:
                require_plotting(BY_KEY[key].cli if cli.get(key) is not None
                                 else BY_KEY[key].ini_label)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
    # dataset paths likewise: relative to where pytest started, or to the ini file
    from .workload import parse_dataset_spec

    o = BY_KEY["dataset"]
    for layer, base, name in ((cli, config.invocation_params.dir, o.cli),
                              (ini, ini_dir, o.ini_label)):
        if layer.get("dataset") is not None:
            try:
                layer["dataset"] = str(parse_dataset_spec(layer["dataset"], name, base=base))
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
    if cli.get("api_key") is None and ini.get("api_key") is None and os.environ.get(ENV_API_KEY):
        cli["api_key"] = os.environ[ENV_API_KEY]
    return cli, ini


def output_path(value: str, base: Path, option: str) -> str:
    """The absolute path of an output file, checked now (its folder made, a file written there
    and removed)."""

    def bad(why: str) -> pytest.UsageError:
        return pytest.UsageError(MSG_OUTPUT_PATH.format(option=option, value=value, why=why))

    if not value.strip() or "\0" in value:
        raise bad("which names no file")
    path = Path(base, value)
    if path.is_dir() or value.endswith(("/", os.sep)):
        raise bad("which is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        raise bad(f"whose folder cannot be written ({getattr(exc, 'strerror', None) or exc})")
    return str(path)


def output_dir(value: str, base: Path, option: str) -> str:
    """The absolute path of an output folder, made and checked now (see :func:`output_path`)."""

    def bad(why: str) -> pytest.UsageError:
        return pytest.UsageError(MSG_OUTPUT_DIR.format(option=option, value=value, why=why))

    if not value.strip() or "\0" in value:
        raise bad("which names no folder")
    path = Path(base, value)
    if path.exists() and not path.is_dir():
        raise bad("which is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        raise bad(f"which cannot be written ({getattr(exc, 'strerror', None) or exc})")
    return str(path)


__all__ = ["MSG_OUTPUT_DIR", "MSG_OUTPUT_PATH", "add_options", "output_dir", "output_path",
           "read_options"]
