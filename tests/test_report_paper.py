"""Paper-ready reports: the LaTeX table (checked by a small parser of the tabular: balanced
braces, as many cells in each row as the column spec has, specials escaped), --label,
--title, the σ row, the legend off the curves, per-class certified accuracy, and the ACR of
sequential runs on a row of its own."""
from __future__ import annotations

import csv
import io
import re

import pytest

from certify.report import per_class, tex_escape
from ancer.results import COLUMNS, read_results
from test_report import HAND_ACR, run_cli, write_cohen_tsv, write_hand_tsv

#: LaTeX's specials, each of which must appear escaped in a cell's text
SPECIALS = "&%$#_{}~^\\"


def tabulars(latex: str) -> list[tuple[str, list[list[str]]]]:
    """Each ``tabular`` of ``latex`` as (column spec, rows of cells), after checking that the
    braces balance and every environment that opens closes."""
    depth = 0
    for i, ch in enumerate(latex):
        if ch in "{}" and (i == 0 or latex[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0, f"a closing brace without an opening one at {i}"
    assert depth == 0, "unbalanced braces"
    begins = re.findall(r"\\begin\{(\w+)\}", latex)
    ends = re.findall(r"\\end\{(\w+)\}", latex)
    assert sorted(begins) == sorted(ends), (begins, ends)
    found = []
    for spec, body in re.findall(r"\\begin\{tabular\}\{([lcr|]+)\}(.*?)\\end\{tabular\}",
                                 latex, flags=re.S):
        rows = []
        for line in body.strip().splitlines():
            line = line.strip()
            if line in (r"\toprule", r"\midrule", r"\bottomrule"):
                continue
            assert line.endswith(r"\\"), f"a row not ended by \\\\: {line!r}"
            cells = re.split(r"(?<!\\)&", line[:-2])
            rows.append([cell.strip() for cell in cells])
        found.append((spec, rows))
    return found


def unescaped_specials(cell: str) -> list[str]:
    """Specials of a cell's text that are not escaped (math and commands allowed)."""
    text = re.sub(r"\$[^$]*\$", "", cell)                       # math: $\sigma$, $r = 0.5$
    text = re.sub(r"\\(textbf|textbackslash|textasciitilde|textasciicircum)\{[^}]*\}", "", text)
    text = re.sub(r"\\[&%$#_{}]", "", text)
    return [ch for ch in text if ch in SPECIALS]


def test_latex_table_compiles_by_the_parser_and_holds_the_numbers(tmp_path, capsys):
    a = write_hand_tsv(tmp_path / "a.tsv", method="isotropic")
    cohen = write_cohen_tsv(tmp_path / "cohen")
    code, out, err = run_cli(capsys, "report", str(a), str(cohen), "--radii", "0,0.5",
                             "--format", "latex", "--label", "ours_50% & {x}",
                             "--label", "Cohen σ=0.25", "--title", "CIFAR-10: l2 #1")
    assert code == 0 and err == ""
    assert r"\usepackage{booktabs}" in out and r"\caption{CIFAR-10: l2 \#1}" in out
    [(spec, rows)] = tabulars(out)
    assert spec == "lrr"
    assert all(len(row) == len(spec) for row in rows), rows
    assert all(unescaped_specials(cell) == [] for row in rows for cell in row), rows
    header, *body = rows
    assert header[1:] == [r"ours\_50\% \& \{x\}", r"Cohen $\sigma$=0.25"]
    by_label = {row[0]: row[1:] for row in body}
    assert by_label[r"$\sigma$"] == ["0.25", "--"]
    # hand run: 4/6 correct at r = 0, 2/6 at 0.5; Cohen's file: 2/4, 1/4; best in bold
    assert by_label["$r = 0$"] == [r"\textbf{0.67}", "0.50"]
    assert by_label["$r = 0.5$"] == [r"\textbf{0.33}", "0.25"]
    assert by_label["ACR"] == [rf"\textbf{{{HAND_ACR:.3f}}}", "0.220"]   # Cohen's: 0.878 / 4


def test_latex_table_of_runs_of_two_norms_bolds_nothing_and_names_the_norms(tmp_path, capsys):
    a = write_hand_tsv(tmp_path / "a.tsv", method="isotropic")
    b = write_hand_tsv(tmp_path / "b.tsv", method="isotropic", norm="l1")
    code, out, _ = run_cli(capsys, "report", str(a), str(b), "--radii", "0", "--format", "latex")
    [(spec, rows)] = tabulars(out)
    assert code == 0 and r"\textbf" not in out
    assert {row[0]: row[1:] for row in rows}["norm"] == [r"$\ell_2$", r"$\ell_1$"]


def test_tex_escape_writes_every_special_literally():
    assert tex_escape(r"a_b%c&d$e#f{g}h~i^j\k") == (
        r"a\_b\%c\&d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k")


def test_labels_name_the_columns_and_must_match_the_files(tmp_path, capsys):
    a = write_hand_tsv(tmp_path / "a.tsv")
    b = write_hand_tsv(tmp_path / "b.tsv", sigma=0.5)
    code, out, _ = run_cli(capsys, "report", str(a), str(b), "--radii", "0", "--label", "σ=0.25",
                           "--label", "σ=0.5", "--title", "Two runs")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "**Two runs**" and lines[2] == "| | σ=0.25 | σ=0.5 |"
    assert "| noise σ | 0.25 | 0.5 |" in lines
    code, out, err = run_cli(capsys, "report", str(a), str(b), "--label", "only one")
    assert code != 0 and out == "" and err.count("\n") == 1
    assert "--label given 1 times for 2 results files" in err


def test_isotropic_runs_have_no_proxy_or_volume_rows_beside_an_anisotropic_one(tmp_path, capsys):
    iso = write_hand_tsv(tmp_path / "iso.tsv", method="isotropic")
    ani = write_hand_tsv(tmp_path / "ani.tsv")
    code, out, _ = run_cli(capsys, "report", str(iso), str(ani), "--radii", "0,0.5")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out.splitlines()}
    assert code == 0 and not any("proxy" in label for label in rows)   # = the radius rows
    volume = rows["share correct with volume radius >= 0.5 (not a certified accuracy)"]
    assert volume == ["—", "0.5000 |"]                                # only the ANCER run's


def _sequential(path, radii):
    """A sequential run's file: the hand rows with grid radii and the group-sequential bound."""
    header, *lines = write_hand_tsv(path, method="isotropic", samples=[600] * 6
                                    ).read_text().splitlines()
    bound = COLUMNS.index("bound")
    out = [header]
    for line, radius in zip(lines, radii):
        fields = line.split("\t")
        fields[3] = fields[COLUMNS.index("proxy_radius")] = repr(radius)
        fields = fields[:bound] + ["group-sequential"]
        out.append("\t".join(fields))
    path.write_text("\n".join(out) + "\n")
    return path


def test_a_sequential_runs_acr_has_a_row_of_its_own(tmp_path, capsys):
    fixed = write_hand_tsv(tmp_path / "fixed.tsv", method="isotropic", samples=[1100] * 6)
    seq = _sequential(tmp_path / "seq.tsv", [0.25, 0.25, 0.5, 0.0, 0.75, 0.0])
    code, out, _ = run_cli(capsys, "report", str(fixed), str(seq), "--radii", "0",
                           "--format", "csv")
    values = {row[0]: row[2:] for row in csv.reader(io.StringIO(out))}
    assert code == 0
    assert values["acr"] == [repr(HAND_ACR), ""]
    assert values["acr_grid"] == ["", repr((0.25 + 0.25 + 0.75) / 6)]   # correct rows only
    code, out, _ = run_cli(capsys, "report", str(fixed), str(seq), "--radii", "0")
    assert "ACR of grid radii (sequential runs" in out and "not comparable" in out


def test_per_class_certified_accuracy_by_hand(tmp_path, capsys):
    path = tmp_path / "c.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.5\t1\t1\n1\t3\t3\t0.2\t1\t1\n2\t3\t5\t0.9\t0\t1\n"
                    "3\t5\t5\t0.7\t1\t1\n")
    classes = per_class(read_results(path), [0.0, 0.5])
    assert [(c.label, c.inputs) for c in classes] == [(3, 3), (5, 1)]
    assert classes[0].curve.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert classes[1].curve.tolist() == [1.0, 1.0]
    code, out, _ = run_cli(capsys, "report", str(path), "--radii", "0,0.5", "--per-class")
    assert code == 0 and "| 3 | 3 | 0.6667 | 0.3333 |" in out and "| 5 | 1 | 1.0000 | 1.0000 |" in out
    code, out, _ = run_cli(capsys, "report", str(path), "--radii", "0.5", "--per-class",
                           "--format", "csv")
    rows = {(row[0], row[1]): row[2] for row in csv.reader(io.StringIO(out))}
    assert float(rows[("certified_accuracy_class_3", "0.5")]) == pytest.approx(1 / 3)
    code, out, _ = run_cli(capsys, "report", str(path), "--radii", "0.5", "--per-class",
                           "--format", "latex")
    per_class_table = tabulars(out)[1]
    assert per_class_table[0] == "lrr" and per_class_table[1][1] == ["3", "3", "0.33"]


def test_the_legend_does_not_cover_the_curves_and_the_title_is_shown(tmp_path):
    pytest.importorskip("matplotlib")
    from certify.report import plot_curves
    runs = [(name, read_results(write_hand_tsv(tmp_path / f"{name}.tsv", method="isotropic",
                                               sigma=sigma)))
            for name, sigma in (("σ=0.25", 0.25), ("σ=0.5", 0.5), ("σ=1", 1.0))]
    figure = plot_curves(runs, tmp_path / "p.png", title="Choosing σ")
    figure.draw_without_rendering()
    [axes] = figure.axes
    legend = axes.get_legend().get_window_extent()
    panel = axes.get_window_extent()
    assert legend.y1 <= panel.y0     # wholly below the panel: no curve can be under it
    assert figure._suptitle.get_text() == "Choosing σ"
    assert [t.get_text()[:6] for t in axes.get_legend().get_texts()] == ["σ=0.25", "σ=0.5 ", "σ=1 (σ"]
