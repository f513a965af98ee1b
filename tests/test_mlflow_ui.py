"""The MLflow UI shows one paper table's runs side by side: a real `mlflow server` on loopback, two runs logged
through `tlvit.tracking.Tracker` into the table's experiment (`tlvit.tables.experiment_for_row`), and the UI
rendered by headless Chromium (its DOM after the JavaScript ran, and a screenshot)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tlvit.tables import experiment_for_row
from tlvit.tracking import Tracker

pytestmark = pytest.mark.e2e

TABLE_RUNS = {"lvvit_s_baseline": 81.25, "lvvit_s_token_labeling": 83.75}  # both rows' first table: LV-ViT Table 3


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium; installs Debian's `chromium` when missing and possible, else skips."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        p = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
        if p.returncode != 0:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
            p = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium timed out")
    if not shutil.which("chromium"):
        pytest.skip(f"apt-get install chromium failed: {p.stderr[-400:]}")
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite store; stopped (its whole process group) afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 40
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _chromium(exe: str, url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The DOM of `url` after its scripts ran (virtual time), optionally with a screenshot of the same load."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1600,1800", "--virtual-time-budget=15000"]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    p = subprocess.run(cmd + ["--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_table_runs_and_top1_in_the_ui(mlflow_server, chromium, tmp_path):
    t0 = time.time()
    experiment = None
    run_ids = {}
    for row, top1 in TABLE_RUNS.items():
        name, tags = experiment_for_row(row, "smoke")
        assert experiment in (None, name)  # one experiment for the table
        experiment = name
        tracker = Tracker(tmp_path / row, name, f"{row}-s0", {"model": "lvvit_e", "supervision": {"kind": row}},
                          {"row": row, **tags}, uri=mlflow_server)
        tracker.log_metrics({"top1": top1}, step=1)
        tracker.finish()
        run_ids[row] = tracker.run_id
    assert experiment == "tlvit-smoke-lvvit_table3"
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                                f"{urllib.parse.quote(experiment)}", timeout=10) as r:
        exp_id = json.load(r)["experiment"]["experiment_id"]

    # The experiment's runs page, sorted by top-1 (best first): both runs, the token-labeling one on top.
    runs_page = f"{mlflow_server}/#/experiments/{exp_id}/runs?orderByKey=metrics.%60top1%60&orderByAsc=false"
    dom = _chromium(chromium, runs_page, tmp_path)
    names = [f"{row}-s0" for row in TABLE_RUNS]
    assert all(n in dom for n in names), "the table's runs are not on the experiment page"
    assert dom.index("lvvit_s_token_labeling-s0") < dom.index("lvvit_s_baseline-s0")

    # The comparison of the table's runs: same metric name, each run's top-1.
    ids = json.dumps(list(run_ids.values()), separators=(",", ":"))
    compare = f"{mlflow_server}/#/compare-runs?runs={ids}&experiments={json.dumps([exp_id])}"
    shot = tmp_path / "mlflow_compare.png"
    dom = _chromium(chromium, compare, tmp_path, screenshot=shot)
    assert all(n in dom for n in names) and ">top1<" in dom
    for top1 in TABLE_RUNS.values():
        assert f"{top1}" in dom, f"top-1 {top1} not shown"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert time.time() - t0 < 60
