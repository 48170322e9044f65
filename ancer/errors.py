"""The project's exception types.

Every error caused by bad input is raised as one of these, with a message that names the
problem and the fix, so that the command line can print it in one line.
"""


class AncerError(Exception):
    """Base class of every error ancer raises on purpose."""


class ArgumentError(AncerError, ValueError):
    """An argument is out of its domain (sigma <= 0, alpha outside (0, 1), a bad shape...)."""


class CheckpointError(AncerError):
    """A checkpoint file is missing, unreadable, or of a format that is not recognized."""


class DatasetError(AncerError):
    """A dataset path is missing or does not hold the expected layout."""


class ResultsError(AncerError):
    """A results file cannot be read, resumed or merged."""
