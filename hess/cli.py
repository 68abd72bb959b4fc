"""The ``hess`` command line: wires subcommands to the modules that implement them.

    hess --help
    hess sweep --name demo --n-trials 20 budget.min_blocks=2
    hess reproduce all --preset demo

Each subcommand lives in the module of its concern, which provides two functions (and may use
``add_config_arguments`` / ``config_from_args`` below for the shared config arguments)::

    def configure_cli(parser: argparse.ArgumentParser) -> None   # add the arguments
    def run_cli(args: argparse.Namespace) -> int                 # do it; exit code

This file only lists which module provides which command (``COMMANDS``) and dispatches.  Only the
selected command's module is imported, so ``hess --help`` is instant.  A command whose module does
not exist yet keeps its documented arguments (``--help`` works) and exits with
``not available yet: needs <module>`` instead of producing anything.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import hess
from hess.config import ConfigError, RunConfig, apply_overrides
from hess.experiment import load_experiment
from hess.registry import Registry

Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, the module that implements it, and the arguments it is
    documented to take until that module exists (``planned``)."""

    name: str
    help: str
    module: str
    planned: Optional[Configure] = None


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, module: str, planned: Optional[Configure] = None) -> None:
    """Register subcommand ``name`` as provided by ``module``."""
    COMMANDS.register(name)(Command(name, help, module, planned))


# ------------------------------------------------------------- shared arguments of config commands
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add positional ``KEY=VALUE`` overrides, ``--config YAML``, ``--preset``, ``--out``, ``--no-wandb``."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. budget.keep_ratio=0.27")
    parser.add_argument("--config", type=Path, help="experiment YAML (ablations/configs/*.yaml)")
    parser.add_argument("--preset", help="preset of the experiment file (demo | paper)")
    parser.add_argument("--out", help="output root (log.out_dir)")
    parser.add_argument("--no-wandb", action="store_true", help="disable W&B (log.wandb_mode=disabled)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults <- experiment file (and preset) <- positional overrides <- ``--out`` / ``--no-wandb``."""
    if args.preset and not args.config:
        raise ConfigError("--preset needs --config (the experiment file that defines the presets)")
    cfg = load_experiment(args.config, args.preset).config if args.config else RunConfig()
    cfg = apply_overrides(cfg, list(args.overrides or []))
    extra: dict[str, Any] = {"log.out_dir": args.out} if args.out else {}
    if args.no_wandb:
        extra["log.wandb_mode"] = "disabled"
    from hess.validate import validate_config

    return validate_config(apply_overrides(cfg, extra))


def _config_only(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")


def _reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rq", choices=["rq1", "rq2", "rq3", "rq4", "rq5", "all"], help="research question")
    parser.add_argument("--preset", choices=["demo", "paper"], default="demo",
                        help="demo: embedded default model + synthetic scenes; paper: VGGT-1B on CO3Dv2/DTU")
    parser.add_argument("--out", help="output root")
    parser.add_argument("--no-wandb", action="store_true", help="disable W&B")


def _report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="result folders or globs (load_results)")
    parser.add_argument("--out", required=True, help="report folder (markdown tables, CSV, PNG)")


def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output root")
    parser.add_argument("--no-wandb", action="store_true", help="disable W&B")


command("calibrate", "compute HeSS head scores on calibration scenes (score artifact)", "hess.rq.calibrate_cli", _config_only)
command("evaluate", "evaluate one model x scenes x method x sparsity; write metrics", "hess.rq.command", _config_only)
command("sweep", "Optuna sweep over config overrides (resumable, multi-worker)", "hess.sweep")
command("reproduce", "run the RQ1-RQ5 experiments and write their tables and plots", "hess.reproduce", _reproduce)
command("report", "tables and plots from stored results", "hess.report", _report)
command("train", "train the embedded default model", "hess.train", _config_only)
command("demo", "a small end-to-end run on the embedded default model", "hess.demo", _demo)
command("rehearse", "rehearse the paper presets on CPU: random weights, CO3Dv2/DTU-format data", "hess.rehearse")


class NotAvailable(RuntimeError):
    """The module implementing a command does not exist (yet)."""


def _provider(cmd: Command) -> ModuleType:
    """Import the command's module; a missing module (or a missing hess module it needs) -> NotAvailable."""
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as err:
        if err.name and (err.name == cmd.module or err.name.startswith("hess")):
            needs = cmd.module if err.name == cmd.module else f"{err.name} (imported by {cmd.module})"
            raise NotAvailable(f"hess {cmd.name}: not available yet: needs {needs}") from None
        raise
    if not (hasattr(module, "configure_cli") and hasattr(module, "run_cli")):
        raise NotAvailable(f"hess {cmd.name}: not available yet: needs {cmd.module}.configure_cli / run_cli")
    return module


def _selected(argv: Sequence[str]) -> Optional[str]:
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, Optional[Callable]]:
    """The parser, with the arguments of the command named in ``argv`` (if any) filled in.

    Returns:
        (parser, run): ``run(args) -> int`` of the selected command, or None.
    """
    parser = argparse.ArgumentParser(prog="hess", description="HeSS: head-wise sparse attention for 3D vision transformers.")
    parser.add_argument("--version", action="version", version=f"hess {hess.__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    selected, run = _selected(argv), None
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        sub = subparsers.add_parser(name, help=cmd.help, description=cmd.help,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != selected:
            continue
        try:
            module = _provider(cmd)
            module.configure_cli(sub)
            run = module.run_cli
        except NotAvailable as err:
            sub.description = f"{cmd.help}\n\nstatus: {err}"
            if cmd.planned is not None:
                cmd.planned(sub)
            run = _unavailable(str(err))
    return parser, run


def _unavailable(message: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 1

    return run


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


#: errors caused by the user's input (config, files, data): exit code 2 and the message alone
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
DEBUG_ENV = "HESS_DEBUG"


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` on the command line or ``HESS_DEBUG=1`` in the environment: show tracebacks."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def error_line(err: BaseException) -> str:
    """The message of ``err`` for the user (a KeyError's text without its quotes; the type when empty)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip() or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hess`` console script; returns the exit code.

    Every error ends as one message on stderr, never a traceback (``--debug`` / ``HESS_DEBUG=1`` re-raise):
    exit code 2 for the user's input (``USER_ERRORS``, bad config, missing or malformed files), 1 for any
    other failure, which names its type and how to see the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser, run = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(_is_override(e) for e in extra):
        args.overrides += extra  # KEY=VALUE after an option (argparse stops collecting positionals there)
    elif extra:
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"hess {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, not a traceback
        if debug:
            raise
        if isinstance(err, USER_ERRORS):
            print(f"hess {args.command}: error: {error_line(err)}", file=sys.stderr)
            return 2
        print(f"hess {args.command}: error: {type(err).__name__}: {error_line(err)} "
              f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
