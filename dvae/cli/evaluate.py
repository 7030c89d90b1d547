"""`dvae-eval`: judge exported tokenizers on your images, the way the field compares them.

    dvae-eval exports/tiny --data photos --out eval/tiny                # a data config's validation split
    dvae-eval exports/a exports/b --data /data/images --size 64 --out eval/ab   # two models, the same crops
    dvae-eval exports/a --data /data/val --size 256 --metrics standard,lpips,rfid --weights ~/weights --out eval/a
"""

from __future__ import annotations

import argparse
import sys

from dvae.cli.exits import run_tool
from dvae.cli.options import add_data_arguments, add_device_arguments
from dvae.errors import os_error_sentence
from dvae.formats.evaluate import evaluate, render


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-eval",
        description="Evaluate one or more exported dVAEs (dvae-export, dvae-import-openai) on the same images: "
                    "PSNR, SSIM and MS-SSIM of argmax-token reconstructions, bits/dim, codebook usage and tokens "
                    "per second; LPIPS and rFID with backbone weights you have (--weights). "
                    "Writes eval.json, eval.md, eval_grid.png, eval_usage.png and eval_atlas.png (every code "
                    "decoded alone) in --out and prints the table.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="export directories; several are compared")
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="where the results go (a new or empty directory)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: the first model's training crop size); images are "
                             "resized (shorter side) and centre-cropped")
    parser.add_argument("--split", default="val", help="for a data config: val (default) or train")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--metrics", default=None, metavar="LIST",
                        help="comma-separated, from psnr, ssim, ms_ssim (images of 176 px or more), bits_per_dim, "
                             "usage, lpips, rfid; 'standard' (the default) is all but lpips and rfid, 'all' is every "
                             "one")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="where the LPIPS and rFID backbone files are (default: the torch hub cache, "
                             "$TORCH_HOME/hub/checkpoints); a missing file is named with where to get it")
    parser.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default alex)")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        report = evaluate(args.models, args.data, args.out, size=args.size, split=args.split,
                          batch_size=args.batch_size, device=args.device, workers=args.workers, force=args.force,
                          data_options=args.data_option, progress=not args.no_progress, metrics=args.metrics,
                          weights_dir=args.weights, lpips_net=args.lpips_net)
        print(render(report), end="")
        print(f"\nwrote eval.json, eval.md and the pictures (eval_grid, eval_usage, eval_atlas) in {args.out}")

    return run_tool("dvae-eval", work, lambda error: f"{os_error_sentence(error)}; fix that and run the command again.")


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
