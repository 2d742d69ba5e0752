"""The `rebased` command: each verb parses its arguments, calls one library function, prints the result.

Verbs register themselves in VERBS: name -> (help, add_arguments, run). The library never prints.
Bad input ends with exit status 2 and one line on stderr, before any work starts: argument types here
(positive_int, positive_ints, positive_float, device) reject malformed values while parsing; a verb's own
checks and the library's raise ValueError, which main() prints the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def verb(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args) -> exit code` as the verb `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        VERBS[name] = (help, add_arguments, run)
        return run

    return register


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers >= 1, e.g. 256,1024."""
    words = [word.strip() for word in text.split(",")]
    try:
        values = tuple(int(word) for word in words)
    except ValueError:
        example = "expected comma-separated integers >= 1 (e.g. 256,1024)"
        raise argparse.ArgumentTypeError(f"{example}, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_floats(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers > 0, e.g. 0.001,0.003."""
    values = tuple(positive_float(word.strip()) for word in text.split(","))
    return values


def names(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated names, none empty."""
    values = tuple(word.strip() for word in text.split(","))
    if not all(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def device(text: str) -> str:
    """argparse type: a torch device this machine has (cpu, cuda, cuda:1)."""
    from rebased.bench.ops import check_device

    try:
        check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rebased", description="ReBased / Based linear attention: ops, models, MQAR, language models, analyses"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add_arguments, _) in VERBS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status (2: bad input)."""
    import rebased.commands  # noqa: F401  (each module there registers its verb)

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # argparse: --help (0) or a malformed argument (2, message printed)
        return exit.code if isinstance(exit.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return VERBS[args.verb][2](args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"rebased {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nrebased {args.verb}: interrupted", file=sys.stderr)
        return INTERRUPTED
