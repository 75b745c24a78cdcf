"""Command line: ``genedml-sd demo`` runs the end-to-end demo on the shipped HER2ST data."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``genedml-sd`` command."""
    parser = argparse.ArgumentParser(prog="genedml-sd", description="Gene-DML on SpatialData.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit on HER2ST patient C, predict an unseen patient-B section")
    demo.add_argument("--out", default="genedml_demo", help="output folder (zarr + PNG)")
    demo.add_argument("--encoder", default="stain-texture", help="frozen encoder name (default works offline)")
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--genes", type=int, default=250)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from genedml_sd._demo import run_demo

        run_demo(args.out, encoder=args.encoder, max_epochs=args.epochs, n_genes=args.genes, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
