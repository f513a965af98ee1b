"""Run tracking. The only module that imports mlflow; training code talks to `Tracker` alone.

Default store: a SQLite file in the working directory (`sqlite:///<cwd>/mlflow.db`, artifacts in
`./mlruns`); `MLFLOW_TRACKING_URI` points it elsewhere (e.g. a server reached from compute nodes).
The run id is kept in the run directory so a resumed or requeued job continues the same run.
If the store cannot be reached, metrics go to `<run_dir>/tracking_buffer.jsonl` (and, when the run
could not even be created, its params and tags to `<run_dir>/tracking_pending.json`); they are
replayed at the next successful connection of the training process, when the run is next opened
(e.g. the `dvc repro` that collects a cluster job), or by `tlvit sync` (`sync_run_dir`). Training
never stops or stalls for tracking: a server is probed with a short timeout before each attempt.
`metric_history` reads a run's per-epoch metrics back (the report's training curves).
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ID_FILE, BUFFER_FILE, PENDING_FILE = "mlflow_run_id", "tracking_buffer.jsonl", "tracking_pending.json"
PROBE_TIMEOUT_S = 3.0
# MLflow's client retries an unreachable server for minutes by default; the buffer makes that pointless.
# Applied with setdefault, so a user's own settings win.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def default_tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else `sqlite:///<root or cwd>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}"


def prepare_store(uri: str) -> None:
    """Create or upgrade a database store's schema once, in this process, before jobs open it concurrently
    (processes migrating a fresh SQLite store at the same time leave it unusable)."""
    if uri.startswith(("http://", "https://", "databricks")):
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # the jobs will buffer; say why now
        log.warning("MLflow store %s cannot be opened (%s: %s); jobs will buffer their metrics", display_uri(uri),
                    type(e).__name__, _redact(str(e), uri))


def server_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """For an http(s) tracking server: does it answer its health check? (Other stores: True.)"""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:  # it answered (auth proxies may refuse /health): reachable
        return e.code < 500
    except (OSError, ValueError):
        return False


class Tracker:
    """One MLflow run: params once, metrics per step, tags; buffered when the store is unreachable."""

    def __init__(self, run_dir: str | Path, experiment: str, run_name: str, params: dict, tags: dict,
                 uri: str | None = None, supersedes: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.id_file = self.run_dir / ID_FILE
        self.buffer = self.run_dir / BUFFER_FILE
        self.pending = self.run_dir / PENDING_FILE
        self.uri = uri or default_tracking_uri()
        if self.uri.startswith(("http://", "https://")):
            for k, v in HTTP_CLIENT_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self.experiment, self.run_name = experiment, run_name
        self.params, self.tags = flatten(params), {k: str(v) for k, v in tags.items()}
        self.run_id: str | None = self.id_file.read_text().strip() if self.id_file.is_file() else None
        self.supersedes = supersedes  # the MLflow run of this folder's previous config (`supersede_run`)
        self.client = None
        self._warned = False
        self._connect()

    # ------------------------------------------------------------------ connection
    def _connect(self) -> bool:
        try:
            if not server_reachable(self.uri):
                raise ConnectionError(f"no answer from {display_uri(self.uri)}/health within {PROBE_TIMEOUT_S:.0f} s")
            import mlflow
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
            if self.run_id is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
                self.run_id = run.info.run_id
                self.id_file.write_text(self.run_id)
                items = list(self.params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                    self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i : i + 100]])
                self.pending.unlink(missing_ok=True)
                if self.supersedes:  # the old run stays as it was, and says which run replaced it (in its name too)
                    self.client.set_tag(self.supersedes, "superseded_by", self.run_id)
                    old_name = self.client.get_run(self.supersedes).info.run_name or ""
                    if not old_name.endswith("(superseded)"):
                        self.client.set_tag(self.supersedes, "mlflow.runName", f"{old_name} (superseded)")
                    self.client.set_tag(self.run_id, "supersedes", self.supersedes)
            else:
                self.client.update_run(self.run_id, status="RUNNING")
                self.set_tags(self.tags)
            _replay(self.client, self.run_id, self.buffer)
            if self._warned:
                log.warning("MLflow at %s reachable again; buffered metrics sent", display_uri(self.uri))
            self._warned = False
            return True
        except Exception as e:  # unreachable server, locked db, ...: keep training, buffer locally
            if not self._warned:
                log.warning("MLflow at %s unreachable (%s); buffering metrics in %s", display_uri(self.uri),
                            _redact(str(e), self.uri), self.buffer)
            self._warned = True
            self.client = None
            if self.run_id is None:  # keep what creating the run needs, for `tlvit sync`
                # the URI without user:password: secrets never reach a file (sync takes them from the environment)
                _write_json(self.pending, {"uri": display_uri(self.uri), "experiment": self.experiment, "run_name": self.run_name,
                                           "params": self.params, "tags": self.tags})
            return False

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        if self.client is not None or self._connect():
            try:
                from mlflow.entities import Metric

                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
                return
            except Exception as e:
                log.warning("MLflow at %s unreachable (log failed: %s); buffering metrics in %s", display_uri(self.uri),
                            _redact(str(e), self.uri), self.buffer)
                self._warned = True
                self.client = None
        with open(self.buffer, "a") as f:
            for k, v in metrics.items():
                f.write(json.dumps({"key": k, "value": float(v), "timestamp": ts, "step": step}) + "\n")

    def set_tags(self, tags: dict) -> None:
        if self.client is None:
            return
        try:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))
        except Exception as e:  # tags are re-sent at the next connection
            log.warning("MLflow could not set tags on %s (%s)", self.run_id, e)
            self.client = None

    def finish(self, status: str = "FINISHED", end_time: float | None = None) -> None:
        """Close the run; end_time (seconds since the epoch): when its training ended, if that was earlier than
        now (a run collected later by the DVC stage keeps its training time as its duration)."""
        if self.client is not None or self._connect():
            try:
                self.client.set_terminated(self.run_id, status=status,
                                           end_time=int(end_time * 1000) if end_time is not None else None)
            except Exception as e:
                log.warning("MLflow could not close run %s (%s); `tlvit sync` closes it later", self.run_id, e)


class NullTracker:
    """Tracking off (mlflow not installed, or `tracking: false`)."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def finish(self, status: str = "FINISHED", end_time: float | None = None) -> None: ...


def supersede_run(run_dir: str | Path, old_config_hash: str) -> str | None:
    """The run folder's config changed: set its MLflow run id (and unsent metrics) aside, so the next Tracker
    creates a new run instead of logging a second training into the old one. Returns the old run id."""
    run_dir = Path(run_dir)
    old = (run_dir / ID_FILE).read_text().strip() if (run_dir / ID_FILE).is_file() else None
    for name in (ID_FILE, BUFFER_FILE, PENDING_FILE):
        if (run_dir / name).exists():
            os.replace(run_dir / name, run_dir / f"{name}.{old_config_hash}.superseded")
    return old


def open_tracker(run_dir, experiment, run_name, params, tags, enabled: bool = True, supersedes: str | None = None):
    """A Tracker, or a NullTracker where tracking is off or mlflow is not installed."""
    if not enabled:
        return NullTracker()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning("mlflow is not installed: tracking off")
        return NullTracker()
    return Tracker(run_dir, experiment, run_name, params, tags, supersedes=supersedes)


# ---------------------------------------------------------------------------- offline buffer
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _replay(client, run_id: str, buffer: Path) -> int:
    """Send buffered metrics (written while the store was unreachable), then drop the buffer."""
    if not buffer.is_file():
        return 0
    from mlflow.entities import Metric

    rows = [json.loads(line) for line in buffer.read_text().splitlines() if line.strip()]
    metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    buffer.unlink()
    return len(metrics)


@dataclass
class SyncResult:
    run_dir: Path
    run_id: str | None
    metrics_sent: int = 0
    created: bool = False
    closed: bool = False
    error: str | None = None


def sync_run_dir(run_dir: str | Path, uri: str | None = None) -> SyncResult:
    """Send what a run buffered while MLflow was unreachable: create the run if it never was, replay the
    metrics, and close the run if training finished (`result.json` says complete). Safe to repeat."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    id_file, buffer, pending = run_dir / ID_FILE, run_dir / BUFFER_FILE, run_dir / PENDING_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    info = json.loads(pending.read_text()) if pending.is_file() else {}
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or info.get("uri") or default_tracking_uri()
    res = SyncResult(run_dir, run_id)
    if run_id is None and not info:
        return res  # never tracked (tracking off, or not rank 0)
    if not server_reachable(uri):
        res.error = f"{display_uri(uri)} unreachable"
        return res
    try:
        client = MlflowClient(uri)
        if run_id is None:
            exp = client.get_experiment_by_name(info["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(info["experiment"])
            run_id = client.create_run(exp_id, run_name=info["run_name"], tags=info["tags"]).info.run_id
            id_file.write_text(run_id)
            items = list(info["params"].items())
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i : i + 100]])
            pending.unlink()
            res.run_id, res.created = run_id, True
        res.metrics_sent = _replay(client, run_id, buffer)
        result = run_dir / "result.json"
        if result.is_file() and json.loads(result.read_text()).get("complete"):
            if client.get_run(run_id).info.status != "FINISHED":
                client.set_terminated(run_id, status="FINISHED")
                res.closed = True
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def latest_metrics(run_dir: str | Path, keys: tuple[str, ...] = ("ema_val_top1", "val_top1"),
                   uri: str | None = None) -> tuple[str | None, float | None, int | None]:
    """(key, value, step) of the newest of `keys` for the run in `run_dir`: from MLflow when reachable,
    else from the offline buffer. (None, None, None) when nothing was logged yet."""
    run_dir = Path(run_dir)
    best: tuple[str | None, float | None, int | None] = (None, None, None)
    id_file = run_dir / ID_FILE
    uri = uri or default_tracking_uri()
    if id_file.is_file() and server_reachable(uri, timeout=2.0):
        try:
            from mlflow.tracking import MlflowClient

            metrics = MlflowClient(uri).get_run(id_file.read_text().strip()).data.metrics
            for key in keys:
                if key in metrics:
                    best = (key, metrics[key], None)
                    break
        except Exception:
            pass
    buffer = run_dir / BUFFER_FILE
    if buffer.is_file():  # newer than anything the store has
        rows = [json.loads(line) for line in buffer.read_text().splitlines() if line.strip()]
        for key in keys:
            hits = [r for r in rows if r["key"] == key]
            if hits:
                last = max(hits, key=lambda r: r["step"])
                return key, last["value"], last["step"]
    return best


# ---------------------------------------------------------------------------- reading runs back
class TrackingReadError(RuntimeError):
    """A run's metrics could not be read from MLflow; the message names the run and the store."""

    def __init__(self, run_id: str, uri: str, reason: str):
        super().__init__(f"MLflow run {run_id} at {display_uri(uri)}: {reason}")
        self.run_id, self.uri, self.reason = run_id, uri, reason


class StoreUnreachable(TrackingReadError):
    """The store did not answer (or does not exist): no other run of it can be read either."""


class RunNotFound(TrackingReadError):
    """The store answered but has no such run."""


def _redact(text: str, uri: str) -> str:
    """`text` (e.g. an exception message quoting the URI) with the URI's user:password removed."""
    return text.replace(uri, display_uri(uri)) if urllib.parse.urlsplit(uri).password else text


def display_uri(uri: str, root: str | Path | None = None) -> str:
    """`uri` fit to print in logs and committed reports: no user:password, a SQLite path under `root` relative."""
    from urllib.parse import urlsplit, urlunsplit

    if uri.startswith("sqlite:///") and root is not None:
        path = Path(uri[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.resolve().relative_to(Path(root).resolve())}"
        except ValueError:
            return uri
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # as given (a round trip through urlunsplit would turn sqlite://// into sqlite://)
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


def missing_local_store(uri: str) -> Path | None:
    """The path of a SQLite or file store that does not exist (MLflow would silently create an empty one)."""
    from urllib.parse import urlsplit

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?")[0])
        return None if path.is_file() else path
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file") and not uri.startswith("databricks"):
        path = Path(urlsplit(uri).path if scheme else uri)
        return None if path.is_dir() else path
    return None


def metric_history(run_id: str, keys: Iterable[str], uri: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """Per key, the run's (step, value) points in MLflow sorted by step; [] for a key never logged.

    One point per step, the last logged: an epoch re-trained after a kill (logged, then killed before its
    checkpoint) is logged again, and the re-trained values are the ones training kept.
    Raises StoreUnreachable / RunNotFound (both TrackingReadError, naming the run and the store). Reads only:
    a missing SQLite file is reported, not created.
    """
    uri = uri or default_tracking_uri()
    missing = missing_local_store(uri)
    if missing is not None:
        raise StoreUnreachable(run_id, uri, "the store does not exist")
    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_CLIENT_DEFAULTS.items():  # fail in seconds, not after minutes of retries
            os.environ.setdefault(k, v)
        if not server_reachable(uri):
            raise StoreUnreachable(run_id, uri, f"no answer from its /health within {PROBE_TIMEOUT_S:.0f} s")
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise StoreUnreachable(run_id, uri, "mlflow is not installed") from None
    try:
        client = MlflowClient(uri)
        client.get_run(run_id)
        out = {}
        for key in keys:
            last: dict[int, float] = {}
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
                last[int(m.step)] = float(m.value)
            out[key] = sorted(last.items())
        return out
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RunNotFound(run_id, uri, "no such run") from e
        if e.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):  # the store answered; other runs may read
            raise TrackingReadError(run_id, uri, str(e)) from e
        raise StoreUnreachable(run_id, uri, f"{type(e).__name__}: {e}") from e
    except Exception as e:  # a locked or corrupt database, a server that went away mid-read, ...
        raise StoreUnreachable(run_id, uri, f"{type(e).__name__}: {e}") from e


MIRROR_TAG = "tlvit.mirror_of"  # on a run that copies another experiment's run into a table's own experiment


def mirror_into_experiment(run_id: str, experiment: str, uri: str | None = None, tags: dict | None = None) -> str | None:
    """A copy of run `run_id` (params, tags, every metric point, status and times) in `experiment`, created once.

    A run lives in one MLflow experiment (its row's first table); a row in several paper tables is copied
    into each other table's experiment, so that every table's experiment holds all of its rows and the UI
    compares them side by side. The copy is tagged `tlvit.mirror_of = <run_id>`, found again by that tag, and
    refreshed when its source has more metric points (a run still training). Returns the copy's run id, or None
    when the source is in `experiment` already.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or default_tracking_uri())
    src = client.get_run(run_id)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    if src.info.experiment_id == exp_id:
        return None
    found = client.search_runs([exp_id], filter_string=f"tags.`{MIRROR_TAG}` = '{run_id}'", max_results=1)
    keys = list(src.data.metrics)
    history = {k: client.get_metric_history(run_id, k) for k in keys}
    if found:
        copy = found[0]
        have = sum(len(client.get_metric_history(copy.info.run_id, k)) for k in keys)
        if have == sum(len(v) for v in history.values()) and copy.info.status == src.info.status:
            return copy.info.run_id
        client.delete_run(copy.info.run_id)  # stale copy of a run that has moved on: copy it again
    own_tags = {k: v for k, v in src.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
    copy = client.create_run(exp_id, start_time=src.info.start_time,
                             tags={**own_tags, **(tags or {}), MIRROR_TAG: run_id},
                             run_name=src.info.run_name)
    cid = copy.info.run_id
    params = [mlflow.entities.Param(k, v) for k, v in src.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(cid, params=params[i:i + 100])
    points = [mlflow.entities.Metric(k, m.value, m.timestamp, m.step) for k, ms in history.items() for m in ms]
    for i in range(0, len(points), 1000):
        client.log_batch(cid, metrics=points[i:i + 1000])
    client.set_terminated(cid, status=src.info.status, end_time=src.info.end_time)
    return cid
