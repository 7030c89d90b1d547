"""Arguments that several commands share, defined once so that they read and behave the same everywhere."""

from __future__ import annotations

import argparse

from dvae.data.images import DATA_CONFIGS


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data and --data-option: the images a command reads (a folder, or a data config and its keys)."""
    parser.add_argument("--data", required=True, metavar="IMAGES_DIR_OR_CONFIG",
                        help=f"a folder of images (searched recursively) or a data config: {', '.join(DATA_CONFIGS)} "
                             "or a .yaml file")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the data config, e.g. root=/data/mnist (repeatable)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --device and --no-progress: how a command runs its model."""
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one; default), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
