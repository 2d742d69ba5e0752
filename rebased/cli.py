"""The `rebased` command: each verb parses its arguments, calls one library function, prints the result.

Verbs register themselves in VERBS: name -> (help, add_arguments, run). The library never prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def verb(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args) -> exit code` as the verb `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        VERBS[name] = (help, add_arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rebased", description="ReBased / Based linear attention: ops, models, MQAR")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add_arguments, _) in VERBS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    import rebased.commands  # noqa: F401  (each module there registers its verb)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return VERBS[args.verb][2](args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"rebased {args.verb}: error: {error}", file=sys.stderr)
        return 2
