"""Options that several commands share, spelt and explained the same way everywhere."""

from __future__ import annotations

import argparse


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--device", default=default, help="auto (CUDA if available), cpu, cuda, cuda:N"
    )


def add_checkpoint_config(parser: argparse.ArgumentParser) -> None:
    """--config for commands that read a checkpoint, whose stored config is the default."""
    parser.add_argument("--config", help="YAML config (default: the checkpoint's)")


def add_seed(parser: argparse.ArgumentParser, what: str) -> None:
    """--seed (default 0) of the random choice `what` names, e.g. "the image sample"."""
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {what}")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (before --only etc.)"
    )
