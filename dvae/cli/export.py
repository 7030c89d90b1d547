"""`dvae-export`: a training checkpoint -> an export directory that `DVAE.from_pretrained` reads.

    dvae-export outputs/2025-01-01/12-00-00 --out exports/tiny              # best.ckpt, EMA weights
    dvae-export run/checkpoints/last.ckpt --out exports/tiny --format npy --weights raw

The checkpoint is read with torch alone (weights_only=True: no code in it runs, and Lightning is not
imported); the model is rebuilt from its hyper-parameters exactly as `DVAELightning` builds it.
"""

from __future__ import annotations

import argparse
import sys
import time

from dvae.cli.exits import run_tool
from dvae.errors import os_error_sentence
from dvae.formats.checkpoint import CHECKPOINTS, WEIGHTS, export
from dvae.pretrained import FORMATS, read_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-export",
        description="Export a trained dVAE (codebook, encoder, decoder, dvae.json) from a dvae-train run "
                    "directory or checkpoint, for DVAE.from_pretrained, dvae-encode and dvae-decode.",
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory of dvae-train, its checkpoints/ directory, or a .ckpt file")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    parser.add_argument("--format", default="safetensors", choices=(*FORMATS, "openai"),
                        help="tensor file format (default: safetensors); openai: encoder.pt and decoder.pt "
                             "state dicts with the official dall_e key names")
    parser.add_argument("--weights", default="ema", choices=tuple(WEIGHTS),
                        help="the EMA weights (validated during training; default) or the raw ones")
    parser.add_argument("--checkpoint", default=None, choices=CHECKPOINTS,
                        help="for a run directory: best (by validation PSNR) or last; default: best, or last for "
                             "a run that never validated")
    parser.add_argument("--force", action="store_true", help="replace the export files in a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()

    def work() -> None:
        out = export(args.source, args.out, args.format, args.weights, args.checkpoint, args.force,
                     say=lambda message: print(f"dvae-export: {message}", file=sys.stderr))
        if args.format == "openai":
            print(f"wrote {out / 'encoder.pt'} and {out / 'decoder.pt'} (official dall_e key names)")
            return
        config = read_config(out)
        source = config["source"]
        files = ", ".join(f"{name} ({(out / name).stat().st_size / 1e6:.2f} MB)" for name in config["files"].values())
        print(f"exported {source['checkpoint']} (step {config['training']['step']}, {args.weights} weights, "
              f"sha256 {source['sha256'][:12]}) to {out} in {time.perf_counter() - start:.1f} s")
        print(f"  codebook [K, D] = [{config['K']}, {config['D']}], {config['downsampling']}x{config['downsampling']} "
              f"pixels per token; files: dvae.json, {files}")

    # permissions, a file where a folder of the path should be, a full disk
    return run_tool("dvae-export", work, lambda error: (
        f"could not write --out {args.out} ({os_error_sentence(error)}); choose a directory you can write to."))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
