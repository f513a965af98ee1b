"""The report's training curves: read from MLflow when its store answers, checked against the JSON copy in the row
metrics, and labelled with their source. A tiny real run (two seeds, three epochs, val every second epoch) is logged
to a temporary SQLite store, read back, tampered with, and its store taken away."""
from __future__ import annotations

import copy
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import test_train

from tlvit.config import config_hash, load_params
from tlvit.layout import Layout
from tlvit.report import build_report
from tlvit.report.curves import METRICS, MLFLOW, check_summary, row_curves, sources_note
from tlvit.report.figures import curves_figure
from tlvit.report.results import Results
from tlvit.tracking import RunNotFound, StoreUnreachable, Tracker, metric_history
from tlvit.train import train

REPO = Path(__file__).resolve().parents[1]
tiny_data, tiny_cfg = test_train.tiny_data, test_train.tiny_cfg  # the tiny dataset fixture and recipe of test_train
ROW = "tiny_curves"  # in no rows.yaml: the report shows its metrics as recorded
KEYS = ["train_loss", "val_top1", "ema_val_top1", "lr"]


def _row_metrics(*args):
    from tlvit.rows import row_metrics  # what the train@<row> stage writes

    return row_metrics(*args)


@pytest.fixture(scope="module")
def tiny_row(tiny_data, tmp_path_factory):
    """Two seeds of one row trained with MLflow on `<root>/mlflow.db`; the row metrics written as the stage does."""
    root = tmp_path_factory.mktemp("curves")
    layout = Layout("smoke", root)
    cfg = tiny_cfg(epochs=3)
    cfg["eval_every"] = 2  # epoch 1 has no val point: None in the JSON copy, no point in MLflow
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        runs = [train(cfg, seed, layout.run_dir(ROW, seed), tiny_data, show_progress=False, experiment="tlvit-test")
                for seed in (0, 1)]
    metrics = _row_metrics(ROW, "smoke", config_hash(cfg), runs)
    layout.row_metrics(ROW).parent.mkdir(parents=True)
    layout.row_metrics(ROW).write_text(json.dumps(metrics))
    return layout, metrics


def _results(layout: Layout, rows: list[str] | None = None) -> Results:
    params = load_params(REPO / "params.yaml")
    params.update(preset=layout.preset, rows=rows or [])
    return Results(layout, params, REPO / "experiments" / "rows.yaml", REPO / "params.yaml")


def _json_points(metrics: dict, seed: int, key: str) -> list[tuple[int, float]]:
    c = metrics["curves"][seed]
    return [(e, v) for e, v in zip(c["epoch"], c[key]) if v is not None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metric_history_has_every_epoch_in_order(tiny_row):
    layout, metrics = tiny_row
    store = f"sqlite:///{layout.root / 'mlflow.db'}"
    for run in metrics["runs"]:
        h = metric_history(run["mlflow_run_id"], KEYS + ["never_logged"], store)
        assert [s for s, _ in h["train_loss"]] == [1, 2, 3] and [s for s, _ in h["val_top1"]] == [2, 3]
        for key in KEYS:
            assert h[key] == _json_points(metrics, run["seed"], key), key
        assert h["never_logged"] == []


def test_metric_history_keeps_the_last_value_of_a_relogged_epoch(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(tmp_path / "run", "e", "r", {}, {}, uri=store)
    for step, value in ((1, 1.0), (2, 2.0), (2, 2.5), (3, 3.0)):  # epoch 2 logged, killed, re-trained, logged again
        t.log_metrics({"train_loss": value}, step=step)
    assert metric_history(t.run_id, ["train_loss"], store)["train_loss"] == [(1, 1.0), (2, 2.5), (3, 3.0)]


def test_metric_history_errors_name_the_run_and_the_store(tiny_row, tmp_path):
    layout, _ = tiny_row
    store = f"sqlite:///{layout.root / 'mlflow.db'}"
    with pytest.raises(RunNotFound, match=rf"MLflow run {'0' * 32} at {store}: no such run"):
        metric_history("0" * 32, ["train_loss"], store)
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(StoreUnreachable, match=rf"MLflow run abc at sqlite:///{missing}: the store does not exist"):
        metric_history("abc", ["train_loss"], f"sqlite:///{missing}")
    assert not missing.parent.exists()  # read only: no empty store created
    down = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(StoreUnreachable, match=rf"MLflow run abc at {down}: no answer"):
        metric_history("abc", ["train_loss"], down)


def test_report_curves_come_from_mlflow_and_equal_the_json_copy(tiny_row, monkeypatch):
    layout, metrics = tiny_row
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store training used: <root>/mlflow.db
    results = _results(layout)
    rc = row_curves(results, ROW)
    run_ids = [r["mlflow_run_id"] for r in metrics["runs"]]
    assert rc.source == MLFLOW and rc.checked and rc.mismatches == [] and rc.run_ids == run_ids
    for key in ("train_loss", "val_top1", "ema_val_top1"):
        if any(_json_points(metrics, s, key) for s in (0, 1)):
            assert [list(zip(*s)) for s in rc.curves[key].seeds] == [_json_points(metrics, s, key) for s in (0, 1)], key
    drawn = curves_figure([ROW], results, layout.root / "curves.png")
    assert drawn == [rc] and (layout.root / "curves.png").stat().st_size > 1000
    note = sources_note(drawn)
    assert f"from MLflow `sqlite:///mlflow.db` for `{ROW}`" in note and not any(r in note for r in run_ids)  # ids: CSV
    assert "disagree" not in note and check_summary(drawn).endswith("all agree.")


def test_a_tampered_json_copy_is_reported(tiny_row, tmp_path, monkeypatch):
    layout, metrics = tiny_row
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{layout.root / 'mlflow.db'}")
    tampered = copy.deepcopy(metrics)
    tampered["curves"][1]["train_loss"][2] += 1e-6  # more than the tolerance
    tampered["curves"][0]["val_top1"][0] = 50.0  # an epoch MLflow never saw
    other = Layout("smoke", tmp_path)
    other.row_metrics(ROW).parent.mkdir(parents=True)
    other.row_metrics(ROW).write_text(json.dumps(tampered))
    rc = row_curves(_results(other), ROW)
    assert rc.source == MLFLOW and rc.mismatches == [
        "seed 0 `val_top1`: epochs [1] in the JSON copy, not in MLflow (buffered offline? `tlvit sync`)",
        "seed 1 `train_loss`: values differ at epochs [3] (max |Δ| 1e-06)"]
    # in the report itself: next to the figure and in the index's summary
    tables = tmp_path / "tables"
    tables.mkdir()
    shutil.copy(REPO / "experiments" / "tables" / "lvvit_table3.yaml", tables)
    params = load_params(REPO / "params.yaml")
    params.update(preset="smoke", rows=[ROW])
    text = build_report(params, tables_dir=tables, rows_path=REPO / "experiments" / "rows.yaml",
                        params_path=REPO / "params.yaml", layout=other, out_dir=tmp_path / "reports").read_text()
    entry = next(line for line in text.splitlines() if "figures/training_curves.png" in line)
    assert "**Curves in the JSON copy and MLflow disagree**" in entry and "`tiny_curves` seed 1 `train_loss`" in entry
    assert f"**the JSON copy and MLflow disagree for `{ROW}`**" in text


@pytest.mark.parametrize("store", ["http", "missing sqlite"])
def test_unreachable_store_falls_back_to_the_json_copy_and_says_so(tiny_row, tmp_path, monkeypatch, store):
    layout, metrics = tiny_row
    uri = f"http://127.0.0.1:{_free_port()}" if store == "http" else f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = row_curves(_results(layout), ROW)
    assert rc.source == METRICS and not rc.checked and not rc.mismatches
    assert rc.why_not_mlflow.startswith(f"run {metrics['runs'][0]['mlflow_run_id']}: ")
    assert ("no answer" if store == "http" else "does not exist") in rc.why_not_mlflow
    assert [list(zip(*s)) for s in rc.curves["train_loss"].seeds] == [_json_points(metrics, s, "train_loss") for s in (0, 1)]
    note = sources_note([rc])
    assert f"from the metrics JSON for `{ROW}` (MLflow `{uri}` not used: run " in note
    assert not (tmp_path / "gone").exists()
