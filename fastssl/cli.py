"""What every `python -m fastssl.X RECIPE key=value ...` entry point shares."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TypeVar

from fastssl import checkpoint
from fastssl.config import ConfigError, RunConfig, load_config
from fastssl.data import beton
from fastssl.engine import NonFiniteLoss

C = TypeVar("C", bound=RunConfig)


def parse(cls: type[C], prog: str, description: str, argv: list[str] | None) -> C:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4 epochs=10")
    args = parser.parse_args(argv)
    return load_config(cls, args.recipe, args.overrides)


def main(cls: type[C], run: Callable[[C], object], prog: str, description: str,
         argv: list[str] | None = None) -> None:
    """Parse, validate, run; a user mistake is one line on stderr and exit 2, never a traceback."""
    try:
        cfg = parse(cls, prog, description, argv)
        cfg.check_run_dir()
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # as argparse does for bad arguments
    except (NonFiniteLoss, checkpoint.Unreadable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def require_beton(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    problem = beton.what_is_wrong(path)
    if problem is not None:
        raise ConfigError(f"{key}={path!r}: {problem}")
