"""The run config as Flower resolves it, in one place for every command that starts or plans a run.

`[tool.flwr.app.config]` of the app's pyproject.toml fused with `--run-config` overrides, with
Flower's own parser (`parse_config_args`, `get_fused_config_from_dir`), then validated by
`common.config.load_config`. The launcher, the local deployment, the planner, the experiment
harness, the audit, the benchmark, `client.prepare_hospitals` and `client.check_data` all read
the defaults here, so a default lives only in pyproject.toml. It lives outside `server/` so that
the hospital's commands (`client/`) may use it too.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml, server/, client/, common/
PATH_KEYS = ("data-dir", "results-dir")


class ConfigProblem(Exception):
    """The run config cannot be resolved or is invalid; the message is user-facing."""


def app_config(app_dir: str | Path = APP_DIR) -> dict[str, Any]:
    """The defaults: `[tool.flwr.app.config]` of the app's pyproject.toml, as written there."""
    with open(Path(app_dir) / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def absolute_path(value: str, cwd: str | Path) -> str:
    """`~` expanded, made absolute against `cwd`, normalised (symlinks are kept)."""
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = Path(cwd) / path
    return os.path.normpath(str(path))


def parse_overrides(run_config_args: Sequence[str] | None) -> dict[str, Any]:
    """Parse `--run-config` values with Flower's own parser (flat dict, TOML-typed values).

    Accepts what `flwr run --run-config` accepts: "k1=1 k2=\"s\"" strings (repeatable) or a
    single path to a .toml file. Unquoted strings are a TOML error in Flower too.
    """
    import click  # noqa: PLC0415 - flwr dependency, imported lazily to keep --help fast
    from flwr.common.config import parse_config_args  # noqa: PLC0415

    try:
        return dict(parse_config_args(list(run_config_args) if run_config_args else None))
    except click.ClickException as err:
        raise ConfigProblem(f"--run-config: {err.message}") from None
    except (ValueError, OSError) as err:
        raise ConfigProblem(f"--run-config: {err}") from None


def resolve_run_config(
    app_dir: str | Path,
    run_config_args: Sequence[str] | None,
    cwd: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return `(fused, overrides)`: the run config the apps will see and the overrides to send.

    The path keys are made absolute in both, and always sent as overrides (also when they come
    from pyproject.toml), because the ServerApp/ClientApps run in other processes.
    """
    from flwr.common.config import get_fused_config_from_dir  # noqa: PLC0415

    cwd = Path.cwd() if cwd is None else Path(cwd)
    overrides = parse_overrides(run_config_args)
    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigProblem(f"no pyproject.toml in app dir {app_dir}")
    try:
        fused = dict(get_fused_config_from_dir(app_dir, overrides))
    except ValueError as err:  # unknown override key, invalid pyproject
        raise ConfigProblem(f"run config: {err} (keys must exist in [tool.flwr.app.config])") from None
    for key in PATH_KEYS:
        value = fused.get(key)
        if isinstance(value, str) and value.strip():
            fused[key] = overrides[key] = absolute_path(value, cwd)
    return fused, overrides


def validate_run_config(fused: Mapping[str, Any]) -> Any:
    """`common.config.load_config(fused)`; a `ConfigError` becomes a `ConfigProblem`."""
    from common.config import ConfigError, load_config  # noqa: PLC0415

    try:
        return load_config(fused)
    except ConfigError as err:
        raise ConfigProblem(str(err)) from None
