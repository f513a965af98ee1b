"""Per-epoch training curves of a row: from MLflow (the live source) or the row metrics file (the recorded copy).

Training logs every epoch to MLflow, and the train stage copies the same values into
`metrics/<preset>/rows/<row>.json` (`curves`). A row is drawn from MLflow when every seed's run can be read
(through `tlvit.tracking`, the only module that imports mlflow), else from that JSON copy, and the report
says which, with the run ids, and why MLflow was not used. When both exist they must agree (same epochs,
values within `TOL`): the JSON copy is what DVC records as the report's input, MLflow what the UI shows,
so a disagreement is listed in the report, never silently drawn over.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field

from tlvit.report.results import Results, RowResult
from tlvit.tracking import StoreUnreachable, TrackingReadError, default_tracking_uri, display_uri, metric_history

log = logging.getLogger(__name__)

KEYS = ("val_top1", "ema_val_top1", "train_loss")  # drawn; every key of the JSON copy is checked
TOL = 1e-9
MLFLOW, METRICS = "MLflow", "metrics JSON"
Points = dict[str, list[tuple[int, float]]]  # key -> [(epoch, value)], epochs without a value left out


@dataclass
class Curves:
    """Per-seed series of one key: epochs and values."""

    key: str
    seeds: list[tuple[list[int], list[float]]]
    source: str  # MLFLOW | METRICS

    def mean(self) -> tuple[list[int], list[float], list[float], list[float]]:
        """(epochs, mean, min, max) over seeds at the epochs every seed has a value for."""
        common = None
        for epochs, _ in self.seeds:
            common = set(epochs) if common is None else common & set(epochs)
        epochs = sorted(common or ())
        per_epoch = [[dict(zip(e, v))[ep] for e, v in self.seeds] for ep in epochs]
        return (epochs, [statistics.fmean(p) for p in per_epoch], [min(p) for p in per_epoch],
                [max(p) for p in per_epoch])


@dataclass
class RowCurves:
    """A row's curves, where they came from, and whether the JSON copy agrees with MLflow."""

    row: str
    source: str  # MLFLOW | METRICS
    store: str  # the MLflow store, as printed
    run_ids: list[str | None]
    curves: dict[str, Curves]  # drawn keys that have values
    why_not_mlflow: str = ""
    mismatches: list[str] = field(default_factory=list)  # "seed 0 `val_top1`: ..." (JSON copy vs MLflow)
    checked: bool = False  # both existed and were compared


class MlflowReader:
    """Reads runs from one store; once the store fails, the rest of the report does not wait on it again."""

    def __init__(self, uri: str):
        self.uri, self.down = uri, None

    def history(self, run_id: str, keys: list[str]) -> Points:
        if self.down:
            raise StoreUnreachable(run_id, self.uri, self.down)
        try:
            return metric_history(run_id, keys, self.uri)
        except StoreUnreachable as e:
            self.down = e.reason
            raise


def row_curves(results: Results, row: str) -> RowCurves | None:
    """The curves of a done row (None otherwise), read once per report; MLflow is the store training used."""
    root = results.layout.root
    reader = results.memo(("mlflow",), lambda: MlflowReader(default_tracking_uri(root)))
    return results.memo(("curves", row), lambda: load_row_curves(results.get(row), reader, display_uri(reader.uri, root)))


def load_row_curves(res: RowResult, reader: MlflowReader, store: str) -> RowCurves | None:
    if not res.done:
        return None
    seeds = [run.get("seed", i) for i, run in enumerate(res.runs)]
    run_ids = [run.get("mlflow_run_id") for run in res.runs]
    copies = {c.get("seed", i): _json_points(c) for i, c in enumerate(res.metrics.get("curves") or [])}
    keys = sorted(set(KEYS).union(*copies.values()))
    live, why = None, ""
    if not run_ids or None in run_ids:
        why = "no MLflow run id (tracking was off)"
    else:
        try:
            live = {seed: reader.history(run_id, keys) for seed, run_id in zip(seeds, run_ids)}
        except TrackingReadError as e:
            why = f"run {e.run_id}: {e.reason}"
    out = RowCurves(res.row, METRICS if live is None else MLFLOW, store, run_ids, {}, why)
    if live is not None:
        out.checked = bool(copies)
        if copies:
            for seed in seeds:
                out.mismatches += _compare(seed, copies.get(seed), live[seed])
        if out.mismatches:
            log.warning("report: %s: the JSON copy of the curves and MLflow (%s) disagree: %s", res.row, store,
                        "; ".join(out.mismatches))
    else:
        log.info("report: %s: curves from the metrics JSON (%s)", res.row, why)
    per_seed = list((copies if live is None else live).values())
    for key in KEYS:
        series = [([s for s, _ in p[key]], [v for _, v in p[key]]) for p in per_seed if p.get(key)]
        if series:
            out.curves[key] = Curves(key, series, out.source)
    return out if out.curves else None


def _json_points(copy: dict) -> Points:
    """The JSON copy of one seed as points; epochs that were not evaluated (None) are not points."""
    epochs = copy.get("epoch")
    out = {}
    for key, values in copy.items():
        if key in ("seed", "epoch") or not isinstance(values, list):
            continue
        steps = epochs or range(1, len(values) + 1)
        out[key] = [(int(s), float(v)) for s, v in zip(steps, values) if v is not None]
    return out


def _compare(seed, copy: Points | None, live: Points) -> list[str]:
    """What differs between the JSON copy and MLflow for one seed, as readable lines (empty when they agree)."""
    if copy is None:
        return [f"seed {seed}: no JSON copy of its curves"]
    out = []
    for key in sorted(copy):
        a, b = dict(copy[key]), dict(live.get(key, []))
        if set(a) - set(b):
            out.append(f"seed {seed} `{key}`: epochs {_few(set(a) - set(b))} in the JSON copy, not in MLflow "
                       "(buffered offline? `tlvit sync`)")
        if set(b) - set(a):
            out.append(f"seed {seed} `{key}`: epochs {_few(set(b) - set(a))} in MLflow, not in the JSON copy")
        off = {s: abs(a[s] - b[s]) for s in set(a) & set(b) if not _same(a[s], b[s])}
        if off:
            out.append(f"seed {seed} `{key}`: values differ at epochs {_few(off)} (max |Δ| {max(off.values()):.3g})")
    return out


def _same(x: float, y: float) -> bool:
    return abs(x - y) <= TOL or (math.isnan(x) and math.isnan(y)) or x == y  # x == y: equal infinities


def _few(steps) -> str:
    s = sorted(steps)
    return str(s) if len(s) <= 6 else f"[{', '.join(map(str, s[:6]))}, … {len(s)} in all]"


def sources_note(drawn: list[RowCurves]) -> str:
    """Markdown for the index: where each row's curves came from (run ids are in provenance.csv), and any
    disagreement between MLflow and the JSON copy."""
    drawn = list({rc.row: rc for rc in drawn}.values())
    live = [rc for rc in drawn if rc.source == MLFLOW]
    parts = []
    for store in dict.fromkeys(rc.store for rc in live):
        rows = [rc for rc in live if rc.store == store]
        unchecked = [f"`{rc.row}`" for rc in rows if not rc.checked]
        parts.append(f"from MLflow `{store}` for {', '.join(f'`{rc.row}`' for rc in rows)}"
                     + (f" (no JSON copy to check for {', '.join(unchecked)})" if unchecked else ""))
    parts += [f"from the metrics JSON for `{rc.row}` (MLflow `{rc.store}` not used: {rc.why_not_mlflow})"
              for rc in drawn if rc.source != MLFLOW]
    text = "Curves: " + "; ".join(parts) + "."
    bad = [f"`{rc.row}` {m}" for rc in drawn for m in rc.mismatches]
    if bad:
        text += " **Curves in the JSON copy and MLflow disagree**: " + "; ".join(bad) + "."
    return text


def check_summary(rows: list[RowCurves]) -> str:
    """One paragraph for the index: how many rows' curves came from where, and whether every check passed."""
    live = [rc for rc in rows if rc.source == MLFLOW]
    bad = [rc.row for rc in rows if rc.mismatches]
    text = (f"{len(live)} of {len(rows)} rows with curves drawn from MLflow, {len(rows) - len(live)} from the metrics "
            f"JSON; {sum(rc.checked for rc in live)} checked against the JSON copy (same epochs, values within {TOL:g}): ")
    if bad:
        return text + f"**the JSON copy and MLflow disagree for {', '.join(f'`{r}`' for r in bad)}** (details next to their figures)."
    return text + "all agree."
