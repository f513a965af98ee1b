"""`tlvit bench fine-tunes`: the downstream stages timed unit by unit on stand-in parents, resumable from a ledger.

No timing assertions: the times are the benchmark's output (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tlvit.bench import fine_tunes
from tlvit.config import load_params, preset_section
from tlvit.tables import DETECTION_TABLE, SEGMENTATION_TABLES, TRANSFER_TABLE, load_column_table, preset_rows

REPO = Path(__file__).resolve().parents[1]
PATHS = (REPO / "params.yaml", REPO / "experiments" / "rows.yaml")


def test_the_plan_is_every_fine_tune_the_stages_run():
    """embedded-downstream: 6 Table 5 rows x 3 seeds on the digits, 45 segmentation fine-tunes (15 (row, head) pairs),
    TL-Align Table 4's 6 Swin rows x 3 seeds."""
    params = load_params(PATHS[0])
    sections = preset_section(params, "embedded-downstream", PATHS[0])
    trained = preset_rows(params, "embedded-downstream", REPO / "experiments" / "tables", PATHS[1], PATHS[0], root=REPO)
    tables = {"transfer": load_column_table(REPO / TRANSFER_TABLE),
              "segmentation": {k: load_column_table(REPO / p) for k, p in SEGMENTATION_TABLES.items()},
              "detection": load_column_table(REPO / DETECTION_TABLE)}
    units = fine_tunes.planned_units(trained, sections, tables, [0, 1, 2], str(PATHS[0]))
    count = lambda stage: sum(u[3] for u in units if u[0] == stage)  # noqa: E731
    assert (count("transfer"), count("segmentation"), count("detection")) == (18, 45, 18)
    assert len(set(u[:3] for u in units)) == len(units)  # each (stage, row, seed) once
    assert {u[1] for u in units if u[0] == "transfer"} >= {"deit_b_tlalign", "deit_b_mixup_cutmix"}


def test_units_are_timed_once_into_the_ledger_and_a_later_call_resumes(tmp_path, monkeypatch):
    """The transfer of a fine-tune row (deit_b_tlalign, whose stand-in's pre-training parent is made too) and of its
    baseline; a second call, on a fresh workdir (a new session), times nothing: the ledger alone is the state."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere-else.db")
    ledger = tmp_path / "ledger.tsv"
    rows = ["deit_b_mixup_cutmix", "deit_b_tlalign"]
    rec = fine_tunes.run(tmp_path / "out", preset="smoke", workdir=tmp_path / "wd1", ledger=ledger,
                         stages=("transfer",), rows=rows, paths=PATHS)
    lines = ledger.read_text().splitlines()
    assert lines[0] == fine_tunes.LEDGER_HEADER and [ln.split("\t")[:4] for ln in lines[1:]] == [
        ["transfer", "deit_b_mixup_cutmix", "0", "1"], ["transfer", "deit_b_tlalign", "0", "1"]]
    assert all(float(ln.split("\t")[4]) > 0 for ln in lines[1:])
    assert rec["settings"]["timed_this_call"] == 2 and rec["results"]["transfer"]["complete"]
    assert rec["results"]["transfer"]["wall_s"] == pytest.approx(sum(float(ln.split("\t")[4]) for ln in lines[1:]),
                                                                 abs=0.2)
    # the stage's own runs happened (a finished fine-tune, its MLflow store in the workdir), on stand-in parents
    assert (tmp_path / "wd1" / "runs" / "smoke" / "transfer" / "digits" / "deit_b_tlalign" / "seed0" /
            "result.json").is_file()
    assert (tmp_path / "wd1" / "runs" / "smoke" / "deit_b_mixup_cutmix" / "seed0" / "checkpoint.pt").is_file()
    assert (tmp_path / "wd1" / "mlflow.db").is_file() and not Path("somewhere-else.db").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///somewhere-else.db"  # the caller's, restored
    again = fine_tunes.run(tmp_path / "out", preset="smoke", workdir=tmp_path / "wd2", ledger=ledger,
                           stages=("transfer",), rows=rows, paths=PATHS)
    assert again["settings"]["timed_this_call"] == 0 and ledger.read_text().splitlines() == lines
    assert not (tmp_path / "wd2" / "data").exists()  # nothing to time: nothing built
    assert json.loads((tmp_path / "out" / "fine-tunes-smoke.json").read_text())["results"]["transfer"][
        "units_measured"] == 2


def test_a_spent_budget_starts_no_unit(tmp_path):
    rec = fine_tunes.run(tmp_path / "out", preset="smoke", workdir=tmp_path / "wd", ledger=tmp_path / "l.tsv",
                         stages=("detection",), rows=["swin_t_mixup_cutmix"], budget_min=0, paths=PATHS)
    assert rec["settings"]["timed_this_call"] == 0 and not (tmp_path / "l.tsv").exists()
    assert rec["results"]["detection"] == {"units": 1, "units_measured": 0, "fine_tunes": 1, "fine_tunes_measured": 0,
                                           "wall_s": 0, "complete": False}


def test_a_file_that_is_not_a_ledger_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_text("my notes\n")
    with pytest.raises(ValueError, match=f"{path}: not a fine-tune ledger"):
        fine_tunes.read_ledger(path)
    assert path.read_text() == "my notes\n"  # left as it was


def test_a_workdir_it_did_not_make_is_refused_and_left_alone(tmp_path):
    """`--workdir .` in a repository would put stand-in checkpoints among its runs and delete its fine-tunes."""
    from tlvit.bench.fixture import BenchDataError

    repo = tmp_path / "repo"
    (repo / "runs" / "smoke" / "transfer").mkdir(parents=True)
    (repo / "runs" / "smoke" / "transfer" / "result.json").write_text("{}")
    with pytest.raises(BenchDataError, match=f"{repo}: not empty and not made by"):
        fine_tunes.run(tmp_path / "out", preset="smoke", workdir=repo, ledger=tmp_path / "l.tsv",
                       stages=("transfer",), rows=["deit_s_cutmix"], paths=PATHS)
    assert (repo / "runs" / "smoke" / "transfer" / "result.json").read_text() == "{}"
    assert not (repo / fine_tunes.MARKER).exists() and not (tmp_path / "l.tsv").exists()
