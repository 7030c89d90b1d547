"""`dvae-import-openai`: the official DALL·E dVAE (encoder.pkl, decoder.pkl) -> an export directory.

    dvae-import-openai --encoder encoder.pkl --decoder decoder.pkl --out exports/openai
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dvae.cli.exits import run_tool
from dvae.errors import ConfigError, os_error_sentence
from dvae.formats.openai import load_openai
from dvae.pretrained import check_out_dir, file_sha256


def main(argv: list[str] | None = None) -> int:
    """`dvae-import-openai`: official pickles -> an export directory `dvae-train init_from=` reads."""
    parser = argparse.ArgumentParser(
        prog="dvae-import-openai",
        description="Convert the official DALL·E dVAE (encoder.pkl, decoder.pkl, or state dicts with the "
                    "official key names) into a dvae export directory, without the dall_e package.",
    )
    parser.add_argument("--encoder", required=True, help="encoder.pkl (or an official-format state dict)")
    parser.add_argument("--decoder", required=True, help="decoder.pkl (or an official-format state dict)")
    parser.add_argument("--out", required=True, help="the export directory to write")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "npy", "pt"))
    parser.add_argument("--force", action="store_true", help="replace an existing export in --out")
    args = parser.parse_args(argv)

    def work() -> None:
        check_out_dir(Path(args.out), args.force)  # before the (large) official files are read
        model = load_openai(args.encoder, args.decoder)
        model.save_pretrained(args.out, format=args.format, force=args.force, metadata={
            "source": "openai", "encoder_sha256": file_sha256(args.encoder),
            "decoder_sha256": file_sha256(args.decoder)})
        print(f"wrote {args.out}: K={model.K}, downsampling {model.downsampling}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
              f"fine-tune with: dvae-train init_from={args.out} scale=learned ...")

    # FileNotFoundError before the OSError sentence: load_openai names the missing file and what to pass
    return run_tool("dvae-import-openai", work,
                    lambda error: f"{os_error_sentence(error)}; fix that (or choose another --out) and run the command "
                                  f"again.", refused=(ValueError, FileNotFoundError, ConfigError))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
