"""One module per command-line verb; importing each registers it with rebased.cli.verb."""

from rebased.commands import bench, generate, mqar  # noqa: F401
