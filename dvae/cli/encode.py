"""`dvae-encode`: images -> token grids on disk, with an exported model.

    dvae-encode --model exports/tiny --data photos/ --out tokens/        # any tree of image files
    dvae-encode --model exports/tiny --data shapes --split val --out tokens/   # a data config
"""

from __future__ import annotations

import argparse
import sys

from dvae.cli.exits import run_tool
from dvae.cli.options import add_data_arguments, add_device_arguments
from dvae.errors import os_error_sentence
from dvae.formats.encode import encode_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-encode",
        description="Turn images into token grids with an exported dVAE (dvae-export). An interrupted run "
                    "continues where it stopped when started again with the same arguments.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="an export directory (dvae-export)")
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, metavar="TOKENS", help="the directory of token shards to write")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels, a multiple of the downsampling factor (default: the training "
                             "crop size in dvae.json); images are resized (shorter side) and centre-cropped")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="for a data config (default: val)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (default: 1024)")
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes (default: 0)")
    parser.add_argument("--force", action="store_true", help="start over in a --out that holds other tokens")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int | None:
        try:
            encode_dataset(args.model, args.data, args.out, size=args.size, split=args.split,
                           batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                           workers=args.workers, force=args.force, data_options=args.data_option,
                           progress=not args.no_progress)
        except KeyboardInterrupt:
            print("dvae-encode: interrupted; run the same command again to continue", file=sys.stderr)
            return 130
        return None

    def file_problem(error: OSError) -> str:  # an unreadable image (our message names it), or a file --out refused
        hint = ("replace it with a readable image, then run the same command to continue (or remove it and add "
                "--force to start over)") if error.filename is None else \
            "fix that, then run the same command to continue"
        return f"{os_error_sentence(error)}; {hint}"

    return run_tool("dvae-encode", work, file_problem)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
