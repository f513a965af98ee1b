"""Recipe search on the tuning split (`tlvit tune`): train candidate recipes on a family's baseline rows, score
them on the `tune` canvases, write one table. The val split is never read: a preset whose `train.eval_split` is
not `tune` is refused.

A search file (experiments/tuning/*.yaml) names the preset, the rows (baseline rows only: what a claim compares
against, never the method it tests), the seeds and the candidates, each a set of dotted overrides of the rows'
resolved config. Every (candidate, row, seed) is an ordinary resumable training run under
`runs/<preset>/tuning/<search>/<candidate>/<row>/seed<k>/` (a killed search resumes where it stopped; a changed
candidate is a new run, the old checkpoint kept aside), logged to MLflow under the experiment
`tlvit-tune-<search>`. The table (`reports/<preset>/tuning/<search>.{md,json}`) gives per candidate the mean
tune top-1, its seed std, the plateau (how far top-1's trend moved over the last 20% of epochs), the final train loss
and the training time, with the commit and config hash of every run.
"""
from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path

import yaml

from tlvit.config import ConfigError, flat_overrides, load_params, resolve_run_config, set_dotted
from tlvit.io import atomic_path, write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit
from tlvit.report.stats import PLATEAU_SHARE, plateau_range, plateau_trend, reported_curve

PLATEAU_POINTS = 0.5  # "trained to a plateau": top-1's trend over the last 20% of epochs moves less than this


def load_search(path: str | Path) -> dict:
    """The search file, checked: preset, rows, seeds, candidates (name -> dotted overrides)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the search file ({e})") from None
    for key, kind in (("preset", str), ("rows", list), ("seeds", list), ("candidates", dict)):
        if not isinstance(spec.get(key), kind):
            raise ConfigError(f"{path}: `{key}` must be a {kind.__name__} (see experiments/tuning/README.md)")
    for name, overrides in spec["candidates"].items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: candidate {name!r} must map dotted keys to values, e.g. {{lr_scale: 4.0}}")
    spec["name"] = path.stem
    return spec


def candidate_config(params: dict, spec: dict, candidate: str, row: str, params_path: str | Path = "params.yaml",
                     rows_path: str | Path = "experiments/rows.yaml") -> dict:
    """The row's config under the search's preset with the candidate's overrides applied."""
    cfg = resolve_run_config(params, row, preset=spec["preset"], rows_path=rows_path, params_path=params_path)
    if cfg.get("eval_split") != "tune":
        raise ConfigError(f"{params_path}: presets.{spec['preset']}.train.eval_split must be `tune`: a recipe search "
                          "never scores on val")
    for key, value in flat_overrides(spec["candidates"][candidate]).items():  # dotted or nested, as in rows.yaml
        set_dotted(cfg, key, value, where=f"{spec['name']} candidate {candidate!r}")
    return cfg


def run_search(spec: dict, params_path: str | Path = "params.yaml", rows_path: str | Path = "experiments/rows.yaml",
               candidates: list[str] | None = None, show_progress: bool = False) -> dict:
    from tlvit.train import RunInputs, train

    params = load_params(params_path)
    layout = Layout(spec["preset"])
    data = layout.dataset()
    names = candidates or list(spec["candidates"])
    unknown = sorted(set(names) - set(spec["candidates"]))
    if unknown:
        raise ConfigError(f"{spec['name']}: unknown candidates {unknown}; pick from {list(spec['candidates'])}")
    results = []
    for name in names:
        for row in spec["rows"]:
            cfg = candidate_config(params, spec, name, row, params_path, rows_path)
            source = cfg["supervision"]["targets"]
            for seed in spec["seeds"]:
                run_dir = layout.root / "runs" / spec["preset"] / "tuning" / spec["name"] / name / row / f"seed{seed}"
                r = train(cfg, seed, run_dir, RunInputs(data["root"], data["kind"], layout.score_maps(source, "train")),
                          show_progress=show_progress, experiment=f"tlvit-tune-{spec['name']}",
                          tags={"tuning_candidate": name})
                curves = r["curves"]
                top1_curve = reported_curve(r, curves)
                results.append({"candidate": name, "row": row, "seed": seed, "tune_top1": r["top1"],
                                "tune_top1_raw": r["top1_raw"], "plateau": plateau_trend(top1_curve, curves["epoch"]),
                                "plateau_range": plateau_range(top1_curve, curves["epoch"]),
                                "train_loss": curves["train_loss"][-1], "train_time_s": r["train_time_s"],
                                "config_hash": r["config_hash"], "git_commit": r["git_commit"],
                                "mlflow_run_id": r["mlflow_run_id"], "epochs": r["epochs"]})
    table = summarise(results)
    out = layout.reports_dir / "tuning" / spec["name"]
    report = {"search": spec["name"], "preset": spec["preset"], "date": dt.date.today().isoformat(),
              "commit": git_commit(), "rows": spec["rows"], "seeds": spec["seeds"], "candidates": spec["candidates"],
              "summary": table, "runs": results}
    write_json(out.with_suffix(".json"), report)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(render(report))
    return report


def summarise(results: list[dict]) -> list[dict]:
    """Per (candidate, row): mean and std of tune top-1 over seeds, worst plateau, mean loss and time."""
    out = []
    for cand, row in dict.fromkeys((r["candidate"], r["row"]) for r in results):  # in the order they ran
        rs = [r for r in results if (r["candidate"], r["row"]) == (cand, row)]
        top1 = [r["tune_top1"] for r in rs]
        plateaus = [r["plateau"] for r in rs if r["plateau"] is not None]
        ranges = [r["plateau_range"] for r in rs if r.get("plateau_range") is not None]
        out.append({"candidate": cand, "row": row, "n": len(rs), "tune_top1": round(statistics.fmean(top1), 2),
                    "tune_top1_std": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
                    "plateau": max(plateaus, key=abs) if plateaus else None,
                    "plateau_range": max(ranges) if ranges else None,
                    "train_loss": round(statistics.fmean(r["train_loss"] for r in rs), 4),
                    "train_min": round(statistics.fmean(r["train_time_s"] for r in rs) / 60, 1)})
    return out


def render(report: dict) -> str:
    lines = [f"# Recipe search `{report['search']}` (preset `{report['preset']}`, tuning split)", "",
             f"{report['date']}, commit {report['commit']}; rows {', '.join(report['rows'])}; seeds {report['seeds']}. "
             f"Plateau: how far top-1 moved over the last {PLATEAU_SHARE:.0%} of epochs by its least-squares trend "
             f"(|trend| < {PLATEAU_POINTS} points counts as converged; the worst seed); range: the largest spread of "
             "single evaluations over the same epochs (evaluation noise included).", "",
             "| candidate | overrides | row | seeds | tune top-1 | std | plateau (trend) | range | train loss | min/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        over = ", ".join(f"{k}={v}" for k, v in report["candidates"][s["candidate"]].items()) or "(preset recipe)"
        std = "" if s["tune_top1_std"] is None else f"{s['tune_top1_std']:.2f}"
        plat = "" if s["plateau"] is None else f"{s['plateau']:+.2f}"
        spread = "" if s.get("plateau_range") is None else f"{s['plateau_range']:.2f}"
        lines.append(f"| {s['candidate']} | {over} | {s['row']} | {s['n']} | {s['tune_top1']:.2f} | {std} | {plat} | {spread} | "
                     f"{s['train_loss']:.4f} | {s['train_min']} |")
    lines += ["", "Runs (config hash, commit, MLflow run):", ""]
    lines += [f"- {r['candidate']} / {r['row']} / seed {r['seed']}: {r['tune_top1']:.2f}, {r['config_hash'][:10]}, "
              f"{r['git_commit']}, {r['mlflow_run_id']}" for r in report["runs"]]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="recipe search on the tuning split (never val): candidates x baseline rows x seeds")
    p.add_argument("search", help="search file, e.g. experiments/tuning/deit_analog.yaml")
    p.add_argument("--only", nargs="*", default=None, help="train only these candidates (the table covers them)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--rows", default="experiments/rows.yaml")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=_run)


def _run(a) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(render(run_search(load_search(a.search), a.params, a.rows, a.only, a.progress)))
