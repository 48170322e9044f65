"""docs/design.md's module table lists every module of ``ancer/`` and ``certify/``, and
names no module that does not exist, so that it cannot drift from the code."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table_paths() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text[text.index("## 2. The modules"):text.index("## 3. Notation")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {path for row in rows for path in re.findall(r"`((?:ancer|certify)/[\w/]*(?:\.py)?)`",
                                                        row.split("|")[1])}


def _modules() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for package in ("ancer", "certify")
            for path in (ROOT / package).rglob("*.py") if path.name != "__init__.py"}


def test_every_module_is_in_the_table_and_every_entry_exists():
    listed = _table_paths()
    folders = {p for p in listed if p.endswith("/")}
    missing = sorted(m for m in _modules()
                     if m not in listed and not any(m.startswith(f) for f in folders))
    assert not missing, f"add these modules to docs/design.md section 2: {missing}"
    stale = sorted(p for p in listed if not (ROOT / p).exists())
    assert not stale, f"docs/design.md section 2 lists modules that do not exist: {stale}"
