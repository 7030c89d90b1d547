"""`dvae-decode`: token grids -> images, with the model that made them.

    dvae-decode --model exports/tiny --tokens tokens/ --out decoded/ [--grid]
"""

from __future__ import annotations

import argparse
import sys

from dvae.cli.exits import run_tool
from dvae.cli.options import add_device_arguments
from dvae.errors import os_error_sentence
from dvae.formats.decode import decode_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-decode",
        description="Turn token grids (dvae-encode) back into images with an exported dVAE.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="an export directory (dvae-export)")
    parser.add_argument("--tokens", required=True, metavar="TOKENS",
                        help="a directory written by dvae-encode, or a .npy file of [N, h, w] tokens")
    parser.add_argument("--out", required=True, metavar="IMAGES_DIR",
                        help="the directory for the PNGs (with --grid: for contact_sheet.png, or a .png path)")
    parser.add_argument("--grid", action="store_true", help="write one contact sheet instead of one PNG per image")
    parser.add_argument("--originals", action="store_true",
                        help="with --grid: put each row of source images above its decodings")
    parser.add_argument("--nrow", type=int, default=8, help="images per row of the contact sheet (default: 8)")
    parser.add_argument("--limit", type=int, default=None,
                        help="decode only the first N (default: all; 64 with --grid)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        decode_tokens(args.model, args.tokens, args.out, grid=args.grid, limit=args.limit, batch_size=args.batch_size,
                      nrow=args.nrow, originals=args.originals, device=args.device, force=args.force,
                      progress=not args.no_progress)

    return run_tool("dvae-decode", work,
                    lambda error: f"{os_error_sentence(error)}; fix that and run the command again.")


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
