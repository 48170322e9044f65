"""Citations: every short citation in the code and docs has its entry in docs/design.md.

Papers are cited by first author and year ("Cohen et al. 2019", "Jeong & Shin 2020"), and
docs/design.md, section "References", holds the one full list. These tests read that list
and every source and document file, and check that the two agree, so that a citation
cannot name a paper (or an author list, or a year) that the list does not hold.
"""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

#: the files whose citations are checked: the library, the application, the benchmarks, the
#: scripts, the tests (this file aside: it names wrong author lists on purpose) and the docs
CITING_FILES = sorted(
    path
    for pattern in ("ancer/**/*.py", "certify/**/*.py", "benchmarks/*.py", "scripts/*.py",
                    "tests/*.py", "docs/*.md", "README.md", "benchmarks/README.md")
    for path in ROOT.glob(pattern)
    if path.resolve() != Path(__file__).resolve()
)

_SURNAME = r"[A-Z][\w'-]*"
_YEAR = r"(?:19|20)\d\d"
#: "Cohen et al. 2019", "Cohen et al. (2019", "Cohen et al., 2019"
ET_AL = re.compile(rf"\b({_SURNAME}) et al\.,? \(?({_YEAR})\b")
#: "Cohen et al." with no year after it (e.g. "Cohen et al.'s code")
ET_AL_ANY = re.compile(rf"\b({_SURNAME}) et al\.")
#: "Jeong & Shin 2020", "Lan & DeMets (1983"
PAIR = re.compile(rf"\b({_SURNAME}) & ({_SURNAME}),? \(?({_YEAR})\b")


def _plain(text: str) -> str:
    """``text`` with accents removed and every run of whitespace (and of comment or
    docstring indentation) made one space, so that a citation broken across lines reads
    as one."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s*\n\s*(?:#:?\s*)?", " ", text)


def _source_text(path: Path) -> str:
    """The plain text of ``path`` as it cites: for docs/design.md, the part before its
    References (the entries themselves are not citations)."""
    text = path.read_text(encoding="utf-8")
    if path == DESIGN:
        text = text.split("\n## 12. References\n", 1)[0]
    return _plain(text)


def reference_entries() -> list:
    """The entries of docs/design.md's References: (surnames, year, text) each."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("\n## 12. References\n", 1)[1]
    entries = []
    for item in re.split(r"\n(?=- )", section):
        if not item.startswith("- "):
            continue
        item = " ".join(item[2:].split())
        authors, _, rest = item.partition(". *")
        assert rest, f"entry without an italic title: {item[:60]!r}"
        surnames = [_plain(name).split()[-1] for name in authors.split(", ")]
        year = re.search(rf"\b{_YEAR}\b", re.sub(r"arXiv:\S+", "", rest.split("*", 1)[1]))
        assert year, f"entry without a year: {item[:60]!r}"
        entries.append((surnames, int(year.group()), item))
    return entries


def citations() -> list:
    """Every short citation in the checked files: (file, kind, surnames, year or None)."""
    found = []
    for path in CITING_FILES:
        text = _source_text(path)
        name = str(path.relative_to(ROOT))
        for m in ET_AL.finditer(text):
            found.append((name, "et al.", (m.group(1),), int(m.group(2))))
        for m in ET_AL_ANY.finditer(text):
            found.append((name, "et al.", (m.group(1),), None))
        for m in PAIR.finditer(text):
            found.append((name, "&", (m.group(1), m.group(2)), int(m.group(3))))
    return found


def _matches(kind: str, surnames: tuple, year, entry) -> bool:
    authors, entry_year, _ = entry
    if year is not None and year != entry_year:
        return False
    if kind == "&":
        return len(authors) == 2 and tuple(authors) == surnames
    return len(authors) >= 3 and authors[0] == surnames[0]


def test_reference_list_is_parsed():
    entries = reference_entries()
    assert len(entries) >= 20
    first_authors = {(authors[0], year) for authors, year, _ in entries}
    assert ("Cohen", 2019) in first_authors and ("Eiras", 2022) in first_authors


def test_citations_are_found_in_the_sources():
    # The scan must see the citations it is meant to check, else the next test proves nothing.
    kinds = {(kind, surnames[0], year) for _, kind, surnames, year in citations()}
    assert ("et al.", "Cohen", 2019) in kinds
    assert ("et al.", "Eiras", 2022) in kinds
    assert ("&", "Jeong", 2020) in kinds


def test_every_short_citation_has_a_reference_entry():
    entries = reference_entries()
    missing = sorted({
        f"{name}: {' & '.join(surnames)}{' et al.' if kind == 'et al.' else ''} {year or ''}"
        for name, kind, surnames, year in citations()
        if not any(_matches(kind, surnames, year, entry) for entry in entries)
    })
    assert not missing, "citations without an entry in docs/design.md, References:\n" + "\n".join(missing)


def test_single_author_citations_have_the_entry_year():
    # "Ville 1939", "Voráček 2024": a single author's surname followed by a year.
    entries = reference_entries()
    singles = {authors[0]: year for authors, year, _ in entries if len(authors) == 1}
    wrong = sorted({
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in CITING_FILES
        for surname, year in singles.items()
        for m in re.finditer(rf"\b{surname}(?:'s)? \(?({_YEAR})\b", _source_text(path))
        if int(m.group(1)) != year
    })
    assert not wrong, "single-author citations with a year the References do not hold:\n" + "\n".join(wrong)


def test_every_entry_is_cited():
    text = " ".join(_source_text(path) for path in CITING_FILES)
    uncited = []
    for authors, year, item in reference_entries():
        if len(authors) == 1:
            short = rf"\b{authors[0]}(?:'s)? \(?{year}\b"
        elif len(authors) == 2:
            short = rf"\b{authors[0]} & {authors[1]},? \(?{year}\b"
        else:
            short = rf"\b{authors[0]} et al\.,? \(?{year}\b"
        if not re.search(short, text):
            uncited.append(item[:70])
    assert not uncited, "entries nothing cites:\n" + "\n".join(uncited)


def test_no_two_entries_share_a_short_form():
    seen = {}
    for authors, year, item in reference_entries():
        key = (authors[0], authors[1] if len(authors) == 2 else "et al.", year)
        assert key not in seen, f"two entries cite as {key}: {seen[key][:50]!r}, {item[:50]!r}"
        seen[key] = item


def test_ancer_entry_has_its_seven_authors():
    ancer = [item for _, _, item in reference_entries() if "*ANCER:" in item]
    assert len(ancer) == 1
    assert ancer[0].startswith(
        "F. Eiras, M. Alfarra, M. P. Kumar, P. H. S. Torr, P. K. Dokania, B. Ghanem, A. Bibi. ")
    assert "arXiv:2107.04570" in ancer[0] and "TMLR" in ancer[0]


@pytest.mark.parametrize("path", CITING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_ancer_is_never_credited_to_the_ddrs_authors(path):
    # ANCER is Eiras et al. 2022; "Alfarra et al. 2022" is DDRS. The author list
    # "Alfarra, Bibi, Khan, Torr & Ghanem" was once given for ANCER and is wrong.
    text = _source_text(path)
    assert "Bibi, " + "Khan" not in text
    assert not re.search(r"ANCER[^.;()]{0,30}\bAlfarra et al\.", text), \
        "ANCER cited as Alfarra et al.; it is Eiras et al. 2022"
