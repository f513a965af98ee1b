"""Every paper table's MLflow experiment holds all of its rows: runs of rows whose first table is another one are
copied in (`tlvit.tracking.mirror_into_experiment`), so the MLflow UI compares a table's rows side by side."""
from __future__ import annotations

from tlvit.report.results import Results
from tlvit.tables import Table


def mirror_table_runs(results: Results, tables: list[Table], uri: str | None = None) -> tuple[int, str | None]:
    """(copies in place in the tables' experiments, why none could be made or None). Reads the done rows' run ids."""
    from tlvit.tracking import (default_tracking_uri, display_uri, mirror_into_experiment, missing_local_store,
                                server_reachable)

    uri = uri or default_tracking_uri(results.layout.root)
    if uri.startswith(("http://", "https://")) and not server_reachable(uri):
        return 0, f"MLflow at {display_uri(uri)} did not answer: the tables' experiments were not completed"
    if missing_local_store(uri) is not None:  # not created by reading it: no run was ever logged there
        return 0, f"no MLflow store at {display_uri(uri)}: nothing to copy"
    copied = 0
    for table in tables:
        experiment = f"tlvit-{results.layout.preset}-{table.key}"
        for row in table.row_ids:
            res = results.get(row)
            if not res.done:
                continue
            for run in res.runs:
                if run.get("mlflow_run_id"):
                    copy = mirror_into_experiment(run["mlflow_run_id"], experiment, uri)
                    copied += copy is not None
    return copied, None
