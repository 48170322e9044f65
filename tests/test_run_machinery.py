"""The run machinery's answers to a researcher's second day (issue 20): a model and a dataset
of other classes, another σ than the checkpoint's, progress in a log file, rows that land
every few minutes, one-line errors for a merge or an --out that cannot be, and each bad
config flag named as the command line spells it."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certify import demo
from ancer.runs import GROUP_SAMPLES, group_size
from certify.progress import Progress
from ancer.results import Row, read_results, sidecar_path
from ancer import CertifyConfig
from cli_helpers import certify, make_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return make_files(tmp_path_factory.mktemp("machinery"))


SMALL = ("--sigma", "0.25", "--n0", "20", "--n", "100", "--batch", "200", "--quiet")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("certify: error: "), err
    assert "Errno" not in err and "Traceback" not in err
    return err


class ThousandClasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_a_model_of_other_classes_is_refused_unless_told(files, tmp_path, capsys):
    model = tmp_path / "thousand.pt"
    torch.jit.save(torch.jit.script(ThousandClasses().eval()), model)
    args = ["--model", str(model), "--data", str(files["data"]), *SMALL, "--max", "2"]
    assert certify(*args, "--out", str(tmp_path / "a.tsv")) == 2
    err = _one_error_line(capsys)
    assert "1000 classes" in err and "up to 2" in err and "--any-classes" in err
    assert not (tmp_path / "a.tsv").exists()
    assert certify(*args, "--any-classes", "--out", str(tmp_path / "b.tsv")) == 0
    assert len(read_results(tmp_path / "b.tsv")) == 2


def test_another_sigma_than_the_checkpoints_is_noted_once(tmp_path, capsys):
    assert certify("--model", str(demo.CHECKPOINT), "--data", str(demo.SAMPLE), "--sigma", "0.5",
                   "--n0", "10", "--n", "50", "--batch", "60", "--max", "1", "--quiet",
                   "--device", "cpu", "--out", str(tmp_path / "r.tsv")) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "records training at σ = 0.25" in line]
    assert len(notes) == 1 and "σ = 0.5" in notes[0]


def _row(correct: bool, samples: int) -> Row:
    return Row(idx=0, label=1, predict=1 if correct else -1, radius=0.5 if correct else 0.0,
               time=1.0, norm="l2", method="isotropic", sigma=0.25, half_width=float("nan"),
               p_lower=0.9, proxy_radius=0.5, volume_radius=0.5, log_volume=0.0, n0=100,
               n=900, alpha=0.001, count_a=900, counts_top2=((1, 900),), precision="fp32",
               samples=samples)


def test_without_a_terminal_progress_comes_as_plain_lines(monkeypatch):
    # pytest's stderr is not a terminal: no bar, plain lines at the interval, with done,
    # rate, ETA and certified so far, and the estimate that says what would shorten the run
    clock = [1000.0]
    monkeypatch.setattr("certify.progress.time.monotonic", lambda: clock[0])
    lines: list[str] = []
    progress = Progress(total=100, done=0, per_input=1000, description="run.tsv", quiet=False,
                        hint="to shorten it: fewer inputs", say=lines.append, every=60.0)
    progress.advance(1000)  # the first batch: warm-up, not the pace
    clock[0] += 30.0
    progress.advance(1000)
    progress.update(_row(True, 1000))
    assert lines == ["this run needs up to 49 min more; to shorten it: fewer inputs"]
    clock[0] += 31.0
    progress.advance(1000)
    assert lines[1:] == ["run.tsv: 1/100 inputs, 3k/100k samples, 32.8 samples/s, ETA 49 min, "
                         "certified 1.000, abstain 0.000"]
    progress.update(_row(False, 1000))
    progress.advance(1000)  # within the interval: no line
    assert len(lines) == 2
    progress.close()  # a last line where the run stopped
    assert lines[2].startswith("run.tsv: 2/100 inputs, 4k/100k") and "abstain 0.500" in lines[2]
    quiet: list[str] = []
    silent = Progress(100, 0, 1000, "run.tsv", quiet=True, hint="x", say=quiet.append, every=0.0)
    clock[0] += 100.0
    silent.advance(1000)
    clock[0] += 100.0
    silent.advance(1000)
    silent.close()
    assert quiet == []


def test_groups_are_sized_from_the_work():
    # n = 100,000 on a CPU takes minutes per input: one input per group, a row each time
    assert group_size(CertifyConfig(sigma=0.25)) == 1
    assert group_size(CertifyConfig(sigma=0.25, n=10_000)) == GROUP_SAMPLES // 10_100
    # small runs keep filling one forward batch with their selection draws
    assert group_size(CertifyConfig(sigma=0.25, n0=100, n=500, batch=600)) == 6
    assert group_size(CertifyConfig(sigma=0.25, n0=2000, n=100, batch=1000)) == 1


def test_a_long_run_writes_a_row_per_input(files, tmp_path):
    out = tmp_path / "long.tsv"
    assert certify("--model", str(files["model"]), "--data", str(files["data"]), "--sigma",
                   "0.25", "--n", "100000", "--max", "2", "--quiet", "--out", str(out)) == 0
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert settings["inputs_per_batch"] == 1 and len(read_results(out)) == 2


def test_merge_without_shards_in_a_missing_folder_is_one_line(tmp_path, capsys):
    assert certify("merge", "--out", str(tmp_path / "o43" / "r.tsv")) == 1
    err = _one_error_line(capsys)
    assert "o43" in err and "does not exist" in err


def test_an_out_that_is_a_folder_is_one_line(files, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert certify("--model", str(files["model"]), "--data", str(files["data"]), *SMALL,
                   "--max", "1", "--out", str(folder)) == 1
    assert "is a folder" in _one_error_line(capsys)
    assert certify("merge", "--out", str(folder)) == 1
    assert "is a folder" in _one_error_line(capsys)


@pytest.mark.parametrize("flags, expected", [
    (("--method", "dds", "--kappa", "2"),
     "certify: error: --kappa: κ weighs ancer's proxy-radius term; drop it for --method 'dds'"),
    (("--theta0", "dds"),
     "certify: error: --theta0: 'dds' is ancer's starting point; use it with --method 'ancer'"),
    (("--opt-lr", "0.1"), "certify: error: --method: optimizer options were given for the "
                          "isotropic method, which optimizes nothing; use --method 'dds' or "
                          "'ancer', or drop them"),
    (("--sequential", "--radii", "5,6", "--num-samples", "600"),
     "certify: error: --radii: no radius in 5.0,6.0 can be certified; the largest with "
     "--num-samples 600 at --alpha 0.001 is 0.569: give smaller radii or a larger n"),
])
def test_config_errors_name_the_flag_as_spelled(files, tmp_path, capsys, flags, expected):
    args = ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--quiet", "--out", str(tmp_path / "r.tsv")]
    assert certify(*args, *flags) == 2
    assert _one_error_line(capsys) == expected


def test_a_run_begun_with_another_default_group_size_resumes_with_it(files, tmp_path):
    out = tmp_path / "r.tsv"
    args = ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--n0", "20", "--n", "100", "--batch", "200", "--quiet", "--out", str(out)]
    assert certify(*args, "--max", "4", "--inputs-per-batch", "3") == 0  # an earlier default
    assert certify(*args, "--max", "8") == 0
    assert json.loads(sidecar_path(out).read_text())["settings"]["inputs_per_batch"] == 3
    assert len(read_results(out)) == 8
