"""Where a training row runs: the `launcher:` section of params.yaml as typed options, and one executor
factory for the three kinds (in this process, submitit's local background processes, Slurm).

Every kind goes through the same code path (`tlvit.launch.launcher.launch_rows`: submit one `RowJob`
per row inside `executor.batch()`, record each job); only the executor differs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tlvit.config import ConfigError

log = logging.getLogger(__name__)

KINDS = ("local", "submitit-local", "slurm")
# Paths that are private to one machine: a compute node cannot see what the login node wrote there.
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
NODE_LOCAL_FSTYPES = ("tmpfs", "ramfs", "devtmpfs")


@dataclass
class SlurmOptions:
    """Resources of one Slurm job (= one training row). Field names follow submitit's AutoExecutor."""

    partition: str | None = None      # -p; None: the cluster's default partition
    account: str | None = None        # -A; where the cluster bills jobs to an account
    qos: str | None = None            # --qos (e.g. a preemptible low-priority QOS)
    constraint: str | None = None     # -C node features, e.g. "a100|h100"
    nodes: int = 1                    # nodes per row; > 1: multi-node DDP (needs a shared `folder`)
    gpus_per_node: int = 0            # GPUs per node; one DDP rank (task) per GPU
    tasks_per_node: int | None = None  # DDP ranks per node; None: gpus_per_node, or 1 without GPUs (CPU DDP: set it)
    cpus_per_task: int = 10           # per rank: the main thread + `train.workers` data loaders (torch threads too)
    mem_gb: float | None = None       # memory per node; None: the partition's default
    timeout_min: int = 1440           # wall time of one allocation; a requeued job gets a new one. Keep >= 50:
                                      # below that submitit counts every preemption as a time-out
    signal_delay_s: int = 120         # USR2 this long before the time limit: time to requeue (the engine
                                      # checkpoints after every epoch, so at most one epoch is redone)
    max_num_timeout: int = 30         # time-limit requeues before submitit gives up (preemptions do not count)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g.
                                      # {exclusive: true, mail_type: END, gpu_bind: closest}

    @property
    def ntasks_per_node(self) -> int:
        """DDP ranks per node."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def validate(self) -> None:
        """Reject values submitit/Slurm would reject later with a less clear message."""
        for name in ("nodes", "cpus_per_task", "timeout_min", "max_num_timeout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"launcher.slurm.{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ConfigError("launcher.slurm: gpus_per_node must be >= 0 and tasks_per_node >= 1 (or null)")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"launcher.slurm: tasks_per_node ({self.tasks_per_node}) must equal gpus_per_node "
                              f"({self.gpus_per_node}): tlvit runs one DDP rank per GPU")
        if not isinstance(self.additional_parameters, dict):
            raise ConfigError("launcher.slurm.additional_parameters must be a mapping of sbatch option -> value")
        if self.timeout_min < 50:
            log.warning("launcher.slurm.timeout_min=%d < 50: submitit then counts every preemption as a time-out "
                        "(max_num_timeout=%d of them end the job)", self.timeout_min, self.max_num_timeout)

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """Keyword arguments of `AutoExecutor.update_parameters` for one row's job."""
        params: dict[str, Any] = {
            "name": name,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "timeout_min": self.timeout_min,
            "slurm_signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        if self.additional_parameters:
            params["slurm_additional_parameters"] = dict(self.additional_parameters)
        return params


@dataclass
class SlurmNode:
    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    default: bool  # in the cluster's default partition


def parse_sinfo(text: str) -> list[SlurmNode]:
    """`sinfo -h -N -o '%P|%c|%m|%G'` (one line per node and partition) -> nodes; GRES like gpu:4 or gpu:a100:8."""
    nodes = []
    for line in text.strip().splitlines():
        part, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        gpus = 0
        for g in gres.split(","):
            fields = g.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                gpus += int(fields[-1])
        nodes.append(SlurmNode(part.rstrip("*"), int(cpus.rstrip("+") or 0), int(mem.rstrip("+") or 0), gpus,
                               part.endswith("*")))
    return nodes


def unfit_reason(opts: "SlurmOptions", nodes: list[SlurmNode]) -> str | None:
    """Why no node of the job's partition can hold one of its nodes' share (None: one can), in launcher.slurm terms."""
    pool = [n for n in nodes if (n.partition == opts.partition if opts.partition else n.default)]
    where = f"partition {opts.partition!r}" if opts.partition else "the default partition"
    if not pool:
        known = sorted({n.partition for n in nodes})
        return f"{where} has no nodes (sinfo lists {known}); set launcher.slurm.partition to one of them"
    cpus = opts.ntasks_per_node * opts.cpus_per_task
    fits = [n for n in pool if n.cpus >= cpus and n.gpus >= opts.gpus_per_node
            and (opts.mem_gb is None or n.mem_mb >= opts.mem_gb * 1024)]
    if fits:
        return None
    most = max(pool, key=lambda n: (n.gpus >= opts.gpus_per_node, n.cpus))
    return (f"launcher.slurm asks each node for {opts.ntasks_per_node} task(s) x {opts.cpus_per_task} CPUs = {cpus} CPUs, "
            f"{opts.gpus_per_node} GPU(s)" + (f", {opts.mem_gb} GB" if opts.mem_gb is not None else "") +
            f"; the largest node of {where} has {most.cpus} CPUs, {most.gpus} GPU(s), {most.mem_mb // 1024} GB (sinfo): "
            "the job would wait forever. Lower launcher.slurm.cpus_per_task / gpus_per_node / mem_gb or pick another "
            "partition")


def check_fits_cluster(opts: "SlurmOptions") -> None:
    """Before sbatch: refuse a request no node can satisfy (Slurm would queue it with no hint)."""
    import subprocess

    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("sinfo unavailable (%s): the job's resources are not checked against the cluster", e)
        return
    if p.returncode != 0:
        log.warning("sinfo failed (%s): the job's resources are not checked against the cluster", p.stderr.strip()[-300:])
        return
    reason = unfit_reason(opts, parse_sinfo(p.stdout))
    if reason:
        raise ConfigError(reason)


@dataclass
class LauncherConfig:
    """`launcher:` in params.yaml."""

    kind: str = "local"               # local (in this process) | submitit-local (background processes) | slurm
    folder: str = "runs/.submitit"    # root of submitit's job folders (pickles, logs); relative = to the repo
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"launcher.kind must be one of {list(KINDS)}, not {self.kind!r}")
        self.slurm.validate()

    def folder_path(self, workdir: str | Path) -> Path:
        """The folder as an absolute path (a relative one is relative to the repository)."""
        p = Path(os.path.expanduser(os.path.expandvars(self.folder)))
        return (p if p.is_absolute() else Path(workdir).resolve() / p).resolve()


def load_launcher_config(params: dict, *, kind: str | None = None, folder: str | None = None,
                         slurm_overrides: dict | None = None, params_path: str | Path = "params.yaml") -> LauncherConfig:
    """The params file's `launcher:` section (defaults where absent), with command-line overrides (`slurm_overrides`:
    launcher.slurm keys, e.g. {"cpus_per_task": 1} for one launch on a small machine)."""
    section = dict(params.get("launcher") or {})
    slurm = {**(section.pop("slurm", None) or {}), **(slurm_overrides or {})}
    known = {f.name for f in dataclasses.fields(LauncherConfig)} - {"slurm"}
    known_slurm = {f.name for f in dataclasses.fields(SlurmOptions)}
    if set(section) - known:
        raise ConfigError(f"{params_path}: unknown launcher key(s) {sorted(set(section) - known)}; known: {sorted(known | {'slurm'})}")
    if set(slurm) - known_slurm:
        raise ConfigError(f"{params_path}: unknown launcher.slurm key(s) {sorted(set(slurm) - known_slurm)}; "
                          f"known: {sorted(known_slurm)}")
    slurm_opts = SlurmOptions(**{k: v for k, v in slurm.items() if v is not None or k in ("tasks_per_node", "mem_gb")})
    if slurm_opts.additional_parameters is None:
        slurm_opts.additional_parameters = {}
    cfg = LauncherConfig(**section, slurm=slurm_opts)
    if kind is not None:
        cfg.kind = kind
    if folder is not None:
        cfg.folder = folder
    cfg.validate()
    preset = (params.get("presets") or {}).get(params.get("preset")) or {}
    if cfg.kind == "slurm" and not cfg.slurm.gpus_per_node and (preset.get("data") or {}).get("kind") == "imagefolder":
        log.warning("%s: launcher.slurm.gpus_per_node is 0 for preset %r (ImageNet-scale): its rows will train on "
                    "%d CPU(s) per task; set gpus_per_node (e.g. 8) to train on GPUs", params_path,
                    params.get("preset"), cfg.slurm.cpus_per_task)
    return cfg


# ---------------------------------------------------------------------------- shared-folder check
def node_local_reason(path: str | Path) -> str | None:
    """Why `path` is private to one machine (tmpfs, /tmp, ...), or None when it may be shared."""
    p = Path(path).resolve()
    for prefix in NODE_LOCAL_PREFIXES:
        if p == Path(prefix) or Path(prefix) in p.parents:
            return f"under {prefix}, which is local to each node"
    mount, fstype = "/", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mp = parts[1].replace("\\040", " ")
                if (p == Path(mp) or Path(mp) in p.parents) and len(mp) >= len(mount):
                    mount, fstype = mp, parts[2]
    if fstype in NODE_LOCAL_FSTYPES:
        return f"on a {fstype} mount ({mount}), which is local to each node"
    return None


def check_shared(cfg: LauncherConfig, workdir: str | Path) -> None:
    """Slurm jobs read the repository and write `launcher.folder` from other machines: both must be shared.

    Multi-node: a clear error when either is node-local. One node: a warning (it works only where the
    compute node is the submitting machine, as on a single-node test cluster).
    """
    if cfg.kind != "slurm":
        return
    for what, path in (("launcher.folder", cfg.folder_path(workdir)), ("the repository", Path(workdir).resolve())):
        reason = node_local_reason(path)
        if reason is None:
            continue
        msg = (f"{what} ({path}) is {reason}; Slurm jobs write checkpoints, logs and results there and the "
               f"launching machine reads them back: put it on a filesystem every node mounts (e.g. /home, /scratch)")
        if cfg.slurm.nodes > 1:
            raise ConfigError(f"{msg} (this is a {cfg.slurm.nodes}-node job)")
        log.warning("%s (fine only when the compute node is this machine)", msg)


# ---------------------------------------------------------------------------- executors
class InProcessJob:
    """A job that already ran in this process (kind `local`): submitit's Job interface, minus the cluster."""

    def __init__(self, job_id: str, fn: Callable[[], Any]):
        self.job_id = job_id
        self._result: Any = None
        self.error: str | None = None
        try:
            self._result = fn()
            self.state = "COMPLETED"
        except Exception:  # a failing row must not stop the others; its record says FAILED
            self.error = traceback.format_exc()
            self.state = "FAILED"
            log.error("job %s failed:\n%s", job_id, self.error)

    def done(self, force_check: bool = False) -> bool:
        return True

    def get_info(self, mode: str = "force") -> dict[str, str]:
        return {"State": self.state}

    def result(self) -> Any:
        if self.error is not None:
            raise RuntimeError(f"job {self.job_id} failed:\n{self.error}")
        return self._result


class InProcessExecutor:
    """Runs each submission at once, in this process (kind `local`; no pickling, no subprocess)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.parameters: dict[str, Any] = {}
        self._count = 0

    def update_parameters(self, **kwargs: Any) -> None:
        self.parameters.update(kwargs)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> InProcessJob:
        self._count += 1
        return InProcessJob(f"local-{os.getpid()}-{self._count}", lambda: fn(*args, **kwargs))


def make_executor(cfg: LauncherConfig, folder: str | Path, name: str = "tlvit"):
    """The executor of `cfg.kind`, with the Slurm options applied (the local kinds ignore the Slurm-only ones).

    folder: submitit's folder for this launch (may contain %j); jobs run `sys.executable` (this venv's python).
    """
    cfg.validate()
    if cfg.kind == "local":
        return InProcessExecutor(folder)
    import submitit

    opts = cfg.slurm
    python = shlex.quote(sys.executable)
    if cfg.kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_num_timeout,
                                         slurm_python=python)
        executor.update_parameters(**opts.executor_parameters(name))
    else:  # submitit-local: background processes on this machine, same job object, same requeue logic
        executor = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=opts.max_num_timeout,
                                         local_python=python)
        executor.update_parameters(name=name, timeout_min=opts.timeout_min, tasks_per_node=opts.ntasks_per_node,
                                   gpus_per_node=opts.gpus_per_node)
    return executor
