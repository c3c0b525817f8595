"""Command line of rmsprop_jax: ``python -m rmsprop_jax <command>``.

Commands:
  demo  train a small MLP on scikit-learn's digits with rmsprop_jax.rmsprop,
        optax.rmsprop and SGD, and compare them (needs the ``demo`` extra).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rmsprop_jax import __version__, demo


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax",
        description="RMSprop for JAX as an optax GradientTransformation.",
    )
    parser.add_argument("--version", action="version", version=f"rmsprop_jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help="compare rmsprop_jax.rmsprop, optax.rmsprop and SGD on scikit-learn's digits and plot the curves",
        description=demo.DESCRIPTION,
    )
    demo.build_parser(demo_parser)
    demo_parser.set_defaults(handler=demo.run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default ``sys.argv[1:]``), runs the chosen command, returns the exit status."""
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
