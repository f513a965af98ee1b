"""`tlvit pool`: the preset's unfinished (row, seed) runs, longest first, N at a time, fine-tunes after their parent."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tlvit.config import config_hash, load_params, resolve_run_config
from tlvit.launch.pool import PoolRun, plan_pool, run_complete, run_pool
from tlvit.layout import Layout

PARAMS, ROWS = "params.yaml", "experiments/rows.yaml"


def test_plan_skips_finished_runs_and_orders_the_longest_first(tmp_path):
    params = load_params(PARAMS)
    params.update(preset="embedded-headline", base="embedded",
                  rows=["lvvit_t_token_labeling", "lvvit_l_token_labeling", "lvvit_s_baseline"], finetunes={})
    layout = Layout("embedded-headline", tmp_path)
    cfg = resolve_run_config(params, "lvvit_s_baseline", rows_path=ROWS, params_path=PARAMS)
    done = layout.run_dir("lvvit_s_baseline", 2)
    done.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"complete": True, "config_hash": config_hash(cfg)}))
    stale = layout.run_dir("lvvit_s_baseline", 3)  # finished for another config: trained again
    stale.mkdir(parents=True)
    (stale / "result.json").write_text(json.dumps({"complete": True, "config_hash": "0" * 12}))
    assert run_complete(done, config_hash(cfg)) and not run_complete(stale, config_hash(cfg))
    runs = plan_pool(params, None, PARAMS, ROWS, root=tmp_path)
    assert [r.row for r in runs[:5]] == ["lvvit_l_token_labeling"] * 5  # the largest model first
    assert [r.row for r in runs[-5:]] == ["lvvit_t_token_labeling"] * 5
    assert sorted(r.seed for r in runs if r.row == "lvvit_s_baseline") == [0, 1, 3, 4]


def test_runs_go_n_at_a_time_and_a_finetune_waits_for_its_parent_seed():
    running, peak, order, lock = [0], [0], [], threading.Lock()

    def fake_train(row, seed, *args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            order.append(("start", row, seed))
        time.sleep(0.05 if row == "parent" else 0.01)
        with lock:
            running[0] -= 1
            order.append(("end", row, seed))
        return row, seed, 50.0

    runs = [PoolRun("parent", 0, None, 3.0), PoolRun("parent", 1, None, 3.0), PoolRun("other", 0, None, 1.0),
            PoolRun("child", 0, "parent", 2.0), PoolRun("child", 1, "parent", 2.0)]
    finished = run_pool(runs, jobs=2, worker=fake_train, executor=ThreadPoolExecutor(2))
    assert len(finished) == 5 and peak[0] == 2
    for seed in (0, 1):
        assert order.index(("end", "parent", seed)) < order.index(("start", "child", seed))

    def failing(row, seed, *args):
        if row == "other":
            raise RuntimeError("diverged")
        return row, seed, 1.0

    with pytest.raises(RuntimeError, match="diverged"):
        run_pool(runs[:3], jobs=1, worker=failing, executor=ThreadPoolExecutor(1))


def _pid(row, seed, *args):
    import os

    return row, seed, float(os.getpid())


def test_each_run_gets_a_fresh_process():
    """One interpreter per run (spawned, max one task each): no torch thread pool or logging prefix carried over."""
    runs = [PoolRun("a", 0, None, 2.0), PoolRun("b", 0, None, 1.0), PoolRun("c", 0, None, 1.0)]
    finished = run_pool(runs, jobs=2, worker=_pid)
    assert sorted(r for r, _, _ in finished) == ["a", "b", "c"] and len({pid for _, _, pid in finished}) == 3
