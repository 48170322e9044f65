"""The project's exception types.

Every error caused by bad input is raised as one of these, with a message that names the
problem and the fix, so that the command line can print it in one line.
"""
from __future__ import annotations

from typing import Callable, Optional


class AncerError(Exception):
    """Base class of every error ancer raises on purpose."""


class ArgumentError(AncerError, ValueError):
    """An argument is out of its domain (sigma <= 0, alpha outside (0, 1), a bad shape...).

    An error about one field of a configuration carries its name in ``field``, and its text
    as a template in which every field is a placeholder, so that an application can name
    the fields as its users spell them (:meth:`spelled`; e.g. command-line flags). ``str``
    names them as the configuration's class ``owner`` does: ``CertifyConfig.n0: ...;
    e.g. n0=100``."""

    def __init__(self, message: str, *, field: Optional[str] = None, owner: str = "",
                 template: Optional[str] = None) -> None:
        self.field = field
        self._template = template
        super().__init__(message if template is None else self._render(
            lambda name: f"{owner}.{name}" if owner else name, lambda name: f"{name}=",
            lambda name, value: f"{name}={value}"))

    @classmethod
    def of_field(cls, owner: str, field: str, problem: str, fix: str) -> "ArgumentError":
        """The error of ``owner``'s ``field`` (of a function's argument when ``owner`` is
        ""): ``problem`` (plain text) and ``fix``, in which ``{name}`` stands for "give field
        ``name`` the value that follows" (``name=``) and ``{name:value}`` for "give field
        ``name`` the value ``value``" (``name=value``; a command line may spell it as a
        switch, ``--name``)."""
        template = "{}: " + problem.replace("{", "{{").replace("}", "}}") + "; " + fix
        return cls("", field=field, owner=owner, template=template)

    def spelled(self, subject: Callable[[str], str], assign: Callable[[str], str],
                setting: Optional[Callable[[str, str], str]] = None) -> str:
        """The message with the field at fault named ``subject(field)``, each ``{name}`` of
        the fix ``assign(name)`` (e.g. ``--n0`` and ``--n0 ``) and each ``{name:value}``
        ``setting(name, value)`` (by default ``assign(name) + value``; e.g. ``--resume``
        for ``{resume:True}``, a switch); the plain text without a field."""
        if self._template is None:
            return str(self)
        return self._render(subject, assign, setting or (lambda name, value: assign(name) + value))

    def _render(self, subject: Callable[[str], str], assign: Callable[[str], str],
                setting: Callable[[str, str], str]) -> str:
        class Field:
            def __init__(self, name: str) -> None:
                self.name = name

            def __format__(self, value: str) -> str:
                return setting(self.name, value) if value else assign(self.name)

        class Spelling(dict):
            def __missing__(self, name: str) -> Field:
                return Field(name)
        return self._template.replace("{}", subject(self.field), 1).format_map(Spelling())


class CheckpointError(AncerError):
    """A checkpoint file is missing, unreadable, or of a format that is not recognized."""


class DatasetError(AncerError):
    """A dataset path is missing or does not hold the expected layout."""


class ResultsError(AncerError):
    """A results file cannot be read, resumed or merged."""
