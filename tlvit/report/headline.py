"""The headline evidence (experiments/headline.yaml): the papers' headline claims as row pairs, judged by the paired
Δ over seeds, with each row's convergence checks and the diagnostics that can explain a claim that does not reproduce.

Written by the report stage as `reports/<preset>/headline.{md,csv}` and `headline_claims.csv` for the preset the
file names (`preset:`); the other presets do not train the headline rows with its seeds.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tlvit.config import ConfigError
from tlvit.report.frames import _fmt, ci_text, short_commit
from tlvit.report.results import DONE, Results
from tlvit.report.stats import (PLATEAU_SHARE, diff_ci95, paired_diff_ci95, paired_verdict, plateau_trend,
                                reported_curve)
from tlvit.tables import Table

HEADLINE_PATH = Path("experiments/headline.yaml")
CRITERIA = ("seeds", "plateau_points", "seed_std_points", "val_canvases", "deit_cutmix_top1", "min_effect_points")


@dataclass(frozen=True)
class Headline:
    preset: str
    criteria: dict
    recipe: dict
    claims: list[dict]
    diagnostic_rows: list[str]
    registered: str

    @property
    def rows(self) -> list[str]:
        """Every row a claim compares, then the diagnostic rows, each once, in reading order."""
        pairs = [r for c in self.claims for pair in c["pairs"] for r in pair]
        return list(dict.fromkeys([*pairs, *self.diagnostic_rows]))


def load_headline(path: str | Path = HEADLINE_PATH) -> Headline:
    """experiments/headline.yaml, checked: claims with `pairs` of two row ids, every criterion present."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the headline claims ({e})") from None
    missing = [k for k in CRITERIA if k not in (spec.get("criteria") or {})]
    if missing:
        raise ConfigError(f"{path}: criteria {missing} missing (each is fixed before the headline run)")
    for claim in spec.get("claims") or []:
        bad = [p for p in claim.get("pairs") or [] if not (isinstance(p, list) and len(p) == 2)]
        if bad or not claim.get("pairs"):
            raise ConfigError(f"{path}: claim {claim.get('id')!r}: `pairs` must list [row, vs] pairs, got {bad or None}")
    if not spec.get("claims") or not isinstance(spec.get("preset"), str):
        raise ConfigError(f"{path}: needs `preset` (where the claims are measured) and `claims`")
    return Headline(spec["preset"], spec["criteria"], spec.get("recipe") or {}, spec["claims"],
                    list(spec.get("diagnostic_rows") or []), str(spec.get("registered", "")))


def seed_values(results: Results, row: str, key: str = "top1") -> dict[int, float]:
    """seed -> value of `key` for a finished row (empty when not done)."""
    res = results.get(row)
    if not res.done:
        return {}
    return {run["seed"]: run[key] for run in res.runs if run.get(key) is not None}


def row_frame(spec: Headline, results: Results) -> pd.DataFrame:
    """One line per headline row: seeds, mean top-1 (the paper's inference rule) and class-token-only, the seed std
    and the worst plateau trend against the criteria, and where each number comes from."""
    crit = spec.criteria
    lines = []
    for row in spec.rows:
        res = results.get(row)
        top1 = seed_values(results, row)
        cls_only = seed_values(results, row, "top1_cls_only")
        trends = []
        if res.done:
            curves = {c.get("seed"): c for c in res.metrics.get("curves") or []}
            for run in res.runs:
                curve = curves.get(run["seed"])
                if curve:
                    t = plateau_trend(reported_curve(run, curve), curve["epoch"])
                    if t is not None:
                        trends.append(t)
        values = list(top1.values())
        std = statistics.stdev(values) if len(values) > 1 else None
        worst = max(trends, key=abs) if trends else None
        lines.append({
            "row_id": row, "Status": res.status, "Seeds": len(values),
            "Top-1": statistics.fmean(values) if values else None, "Seed std": std,
            "Class token only": statistics.fmean(cls_only.values()) if cls_only else None,
            "Plateau trend": worst,
            "Seeds ok": len(values) >= crit["seeds"],
            "Std ok": std is not None and std <= crit["seed_std_points"],
            "Plateau ok": worst is not None and abs(worst) < crit["plateau_points"] and len(trends) == len(values),
            "Params (M)": results.params_m(row),
            "MLflow runs": ", ".join(run.get("mlflow_run_id") or "-" for run in res.runs) if res.done else "",
            "Commit": ", ".join(sorted({short_commit(run.get("git_commit")) for run in res.runs})) if res.done else "",
            "Config": res.expected_hash or "",
            "Note": res.note,
        })
    return pd.DataFrame(lines)


def paper_delta(row: str, vs: str, tables: list[Table]) -> tuple[float | None, str]:
    """The paper's Δ (row - vs) from the first table that prints both rows, and that table's key."""
    for t in tables:
        paper = {r["row"]: r.get("paper") for r in t.rows}
        if paper.get(row) is not None and paper.get(vs) is not None:
            return round(paper[row] - paper[vs], 2), t.key
    return None, ""


def claims_frame(spec: Headline, results: Results, tables: list[Table]) -> pd.DataFrame:
    """One line per row pair: the paper's Δ, the paired Δ over common seeds with its 95% CI (the verdict's), Welch's
    Δ and CI beside it, and the verdict against the pre-registered smallest effect of interest."""
    lines = []
    for claim in spec.claims:
        for row, vs in claim["pairs"]:
            a, b = seed_values(results, row), seed_values(results, vs)
            delta, half, n = paired_diff_ci95(a, b)
            welch, welch_half = diff_ci95(list(a.values()), list(b.values())) if a and b else (None, None)
            v = paired_verdict(delta, half, n, spec.criteria["min_effect_points"])
            pd_, table = paper_delta(row, vs, tables)
            lines.append({"Claim": claim["id"], "Pair": f"{row} > {vs}", "Paper Δ": pd_, "Paper table": table,
                          "Paired Δ": delta, "Paired CI half-width": half, "Pairs": n, "Welch Δ": welch,
                          "Welch CI half-width": welch_half, "Verdict": v.text, "kind": v.kind,
                          "row_id": row, "vs_id": vs})
    return pd.DataFrame(lines)


def _check(ok: bool, status: str) -> str:
    return "—" if status != DONE else ("✓" if ok else "✗")


def diagnostics(spec: Headline, results: Results, rows: pd.DataFrame) -> list[str]:
    """What can explain a claim that does not reproduce, as measured on this preset's runs."""
    out = []
    by_row = rows.set_index("row_id")
    dense = _dense_accuracy(results)
    if dense:
        out.append(f"- **Annotator** (the token labels' source): dense-label accuracy on val {dense['val']:.2f}% "
                   f"(primary-digit pixels {dense['primary']:.2f}%, distractor pixels {dense['secondary']:.2f}%).")
    oracle = [r for r in spec.diagnostic_rows if "oracle" in r]
    for row in oracle:
        if row in by_row.index and by_row.at[row, "Status"] == DONE:
            tl = "lvvit_s_token_labeling"
            gap = paired_diff_ci95(seed_values(results, row), seed_values(results, tl))
            out.append(f"- **Oracle ceiling**: `{row}` (token labeling on ground-truth maps) "
                       f"{by_row.at[row, 'Top-1']:.2f}%; against `{tl}` {ci_text(gap[0], gap[1])} (paired, {gap[2]} seeds): "
                       "what better token labels could add at this scale.")
    gaps = [(r, by_row.at[r, "Top-1"] - by_row.at[r, "Class token only"]) for r in by_row.index
            if by_row.at[r, "Status"] == DONE and by_row.at[r, "Class token only"] is not None
            and not pd.isna(by_row.at[r, "Class token only"])
            and abs(by_row.at[r, "Top-1"] - by_row.at[r, "Class token only"]) > 1e-9]
    if gaps:
        out.append("- **Inference rule** (`cls + 0.5·max(aux)` minus class token only, mean over seeds): "
                   + ", ".join(f"`{r}` {g:+.2f}" for r, g in gaps) + ".")
    rmse = _rmse(results)
    if rmse:
        out.append("- **Label misalignment** (RMSE between the CutMix target and the TL-Align label of the class "
                   "token after the last block, 256 val images mixed in pairs): "
                   + ", ".join(f"`{r}` {v:.3f}" for r, v in rmse.items())
                   + ". TL-Align can only help where CutMix's area target is wrong, i.e. where this is large.")
    not_converged = [r for r in by_row.index if by_row.at[r, "Status"] == DONE
                     and not (by_row.at[r, "Plateau ok"] and by_row.at[r, "Std ok"])]
    if not_converged:
        out.append("- **Convergence**: rows missing the plateau or seed-std criterion (their claims are read with "
                   "that caveat): " + ", ".join(f"`{r}`" for r in not_converged) + ".")
    return out


def _dense_accuracy(results: Results) -> dict | None:
    import json

    path = results.layout.metrics_dir / "scoremaps.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    if "val_dense_acc" not in m:
        return None
    return {"val": m["val_dense_acc"], "primary": m["val_dense_acc_primary"], "secondary": m["val_dense_acc_secondary"]}


def _rmse(results: Results) -> dict[str, float]:
    from tlvit.report.alignment import load_trained, rmse_per_block

    out = {}
    for row in ("deit_s_cutmix", "deit_s_tlalign"):
        trained = load_trained(results, row)
        if trained is not None:
            out[row] = float(rmse_per_block(results, trained)[0][-1])
    return out


def render(spec: Headline, results: Results, rows: pd.DataFrame, claims: pd.DataFrame, commit: str) -> str:
    crit = spec.criteria
    recipe = spec.recipe
    frozen = (f"frozen on {recipe.get('frozen')} at commit `{recipe.get('commit')}`" if recipe.get("status") == "frozen"
              else f"**not frozen** (status `{recipe.get('status')}`): these numbers are not the headline evidence")
    head = [f"# Headline claims (preset `{results.layout.preset}`)", "",
            f"Claims and criteria registered {spec.registered} in `experiments/headline.yaml`; recipe {frozen}. "
            f"Report regenerated at commit `{commit}`. Top-1 is the paper's inference rule (EMA model where the recipe "
            f"has one); a claim `row > vs` is judged on the paired Δ over the seeds both rows ran (same seed: same "
            f"init, data order, augmentation and mixing draws) with its 95% Student-t CI; Welch's unpaired interval "
            f"is beside it. Verdicts: *reproduced* (CI above 0), *opposite* (CI below 0), *not reproduced* (CI "
            f"includes 0 and excludes gains of {crit['min_effect_points']:g} points or more), *inconclusive* (the CI "
            "also includes such gains).", "",
            "## Claims", ""]
    shown = pd.DataFrame({
        "Claim": claims["Claim"], "Pair": claims["Pair"],
        "Paper Δ": [f"{_fmt(d, True)} ({t})" if t else "—" for d, t in zip(claims["Paper Δ"], claims["Paper table"])],
        "Paired Δ [95% CI]": [ci_text(d, h) for d, h in zip(claims["Paired Δ"], claims["Paired CI half-width"])],
        "Pairs": claims["Pairs"],
        "Welch Δ [95% CI]": [ci_text(d, h) for d, h in zip(claims["Welch Δ"], claims["Welch CI half-width"])],
        "Verdict": claims["Verdict"],
    })
    tally = claims["kind"].value_counts()
    texts = {c["id"]: f"- `{c['id']}` ({c['source']}): {c['text']}" for c in spec.claims}
    body = head + ["\n".join(texts.values()), "", shown.to_markdown(index=False, disable_numparse=True), "",
                   "Verdicts: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in tally.items()) + ".", ""]
    rshown = pd.DataFrame({
        "Row": rows["row_id"], "Seeds": rows["Seeds"],
        "Top-1": [_fmt(v) for v in rows["Top-1"]], "Seed std": [_fmt(v) for v in rows["Seed std"]],
        "Class token only": [_fmt(v) for v in rows["Class token only"]],
        f"Plateau trend (last {PLATEAU_SHARE:.0%})": [_fmt(v, True) for v in rows["Plateau trend"]],
        f"Std ≤ {crit['seed_std_points']:g}": [_check(ok, s) for ok, s in zip(rows["Std ok"], rows["Status"])],
        f"Plateau < {crit['plateau_points']:g}": [_check(ok, s) for ok, s in zip(rows["Plateau ok"], rows["Status"])],
        "Params (M)": [_fmt(v) if v is not None and v >= 10 else ("—" if v is None else f"{v:.3f}") for v in rows["Params (M)"]],
        "Status": rows["Status"], "Commit": rows["Commit"], "Config": rows["Config"],
    })
    body += ["## Rows", "",
             f"Criteria: ≥ {crit['seeds']} seeds, seed std ≤ {crit['seed_std_points']:g} points, |trend of top-1 over "
             f"the last {PLATEAU_SHARE:.0%} of epochs| < {crit['plateau_points']:g} points (worst seed; least-squares "
             "slope times the window, so single evaluations' noise averages out). Per-seed MLflow runs: "
             "`headline.csv`.", "", rshown.to_markdown(index=False, disable_numparse=True), ""]
    diag = diagnostics(spec, results, rows)
    body += ["## Diagnostics", "", *(diag or ["- none measured yet"]), ""]
    return "\n".join(body)


def write_headline(spec: Headline, results: Results, tables: list[Table], out: Path, commit: str, write_text) -> dict:
    """headline.md, headline.csv (rows) and headline_claims.csv in `out`; returns the verdict tally."""
    rows = row_frame(spec, results)
    claims = claims_frame(spec, results, tables)
    write_text(out / "headline.md", render(spec, results, rows, claims, commit))
    write_text(out / "headline.csv", rows.to_csv(index=False))
    write_text(out / "headline_claims.csv", claims.to_csv(index=False))
    return claims["kind"].value_counts().to_dict()
