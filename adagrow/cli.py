"""The ``adagrow`` command line."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from adagrow import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adagrow",
        description="Grow, reparameterize, quantize (OBS, overlap-aware) and deploy PyTorch models.",
        epilog="Subcommands (grow, reparam, quantize, export, bench, demo) are being added; "
        "the Python API is documented in README.md.",
    )
    parser.add_argument("--version", action="version", version=f"adagrow {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
