"""Helpers shared by the tests that run the ``certify`` command in-process."""
from pathlib import Path

from certify.cli import main
from certify.results import read_results


def certify(*argv: str) -> int:
    """Run ``certify ARGV...`` in this process; its exit status."""
    return main(list(argv))


def rows_without_time(path: Path) -> list[tuple[str, ...]]:
    """The rows of a results file as text fields, less the ``time`` column (which differs
    between otherwise identical runs)."""
    table = read_results(path)
    keep = [i for i, name in enumerate(table.header) if name != "time"]
    return [tuple(line.split("\t")[i] for i in keep) for line in table.lines]
