"""One module per command-line verb; importing each registers it with rebased.cli.verb."""

from rebased.commands import analyze, bench, compare, data, evaluate, export_hf, generate, mqar, train  # noqa: F401
