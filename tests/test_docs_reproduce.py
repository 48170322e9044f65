"""Snippets of the docs reproduce: docs/python.md section 6's optimizer example prints the
certificates the doc shows (it drew CERTIFY's noise from torch's global generator before,
and printed 0.2103, 0.2896, 0.2737 on three runs; a random draw matching the doc's four
decimals twice is out of reach)."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from certify import demo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not demo.CHECKPOINT.is_file(), reason="shipped model absent")


def snippet_and_output(doc: Path, marker: str) -> tuple[str, str]:
    """The ```python block of ``doc`` holding ``marker``, and the ``` block after it."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), flags=re.S)
    for i, (kind, code) in enumerate(blocks):
        if kind == "python" and marker in code:
            return code, blocks[i + 1][1]
    raise AssertionError(f"no python block with {marker!r} in {doc}")


def run(code: str) -> str:
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)   # the docs' paths are relative to the repository's root
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "snippet", "exec"), {"__name__": "snippet"})
    finally:
        os.chdir(cwd)
    return out.getvalue()


@pytest.mark.slow
def test_python_md_section_6_optimizer_example_is_seeded_and_prints_what_it_shows():
    code, shown = snippet_and_output(ROOT / "docs" / "python.md", "certify_with_scales(smoothed")
    assert run(code).splitlines()[-2:] == shown.splitlines()[-2:]   # the certificates' lines
