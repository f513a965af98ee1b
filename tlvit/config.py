"""Configs as data: `params.yaml` presets + `experiments/rows.yaml` overrides, merged once.

A run's resolved config is a plain dict (saved next to its checkpoints); its identity is the hash of
that dict without the seed, so a row that appears in several tables trains once.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params/rows file that cannot be used; the message names the file and the fix."""


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); fix the syntax") from e


def load_params(path: str | Path = "params.yaml") -> dict:
    """The whole params file, each preset's sections merged over the `defaults` block (the preset's values win)."""
    params = read_yaml(path)
    if not isinstance(params, dict) or "presets" not in params:
        raise ConfigError(f"{path}: expected a mapping with a `presets` section")
    defaults = params.get("defaults") or {}
    for name, preset in params["presets"].items():
        for section, values in defaults.items():
            preset[section] = merged(values, preset.get(section) or {})
    return params


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (a fresh dict; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def preset_section(params: dict, preset: str | None = None, params_path: str | Path = "params.yaml") -> dict:
    """The chosen preset's sections (data, annotator, scoremaps, train, seeds)."""
    name = preset or params.get("preset")
    presets = params["presets"]
    if name not in presets:
        raise ConfigError(f"{params_path}: unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]


def load_rows(path: str | Path = "experiments/rows.yaml") -> dict:
    """Row id -> {description, overrides}."""
    rows = read_yaml(path) or {}
    if not isinstance(rows, dict):
        raise ConfigError(f"{path}: expected a mapping of row id -> row")
    return rows


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def check_type(dotted: str, value: Any, default: Any, *, where: str) -> None:
    """`value` must be of the kind of the recipe's `default` (None: anything), named in the error with the fix.

    YAML reads `1e-3` (no dot) as a string, which DVC compares as a number: training would die later on a
    raw TypeError, so it fails here, naming the file and the key.
    """
    if default is None or value is None or _type_name(value) == _type_name(default):
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: {dotted} must be a whole number (the recipe has {default!r}), not {value!r}")
        return
    hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if isinstance(value, str) and _looks_numeric(value) else ""
    raise ConfigError(f"{where}: {dotted} is {_type_name(value)} ({value!r}); the recipe's value is "
                      f"{_type_name(default)} ({default!r}){hint}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def set_dotted(cfg: dict, dotted: str, value: Any, *, where: str) -> None:
    """cfg['a']['b'] = value for dotted='a.b'; the key must already exist (typos fail loudly) and `value` be of
    the kind of the value it replaces (`check_type`)."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            # model_kwargs is open-ended: constructor arguments are checked by the model itself
            if parts[0] == "model_kwargs" and i == len(parts) - 1 and isinstance(node, dict):
                break
            known = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"{where}: unknown config key {dotted!r} (no {part!r}; known here: {known})")
        if i < len(parts) - 1:
            node = node[part]
    check_type(dotted, value, node.get(parts[-1]), where=where)
    node[parts[-1]] = value


def resolve_run_config(
    params: dict,
    row_id: str,
    *,
    preset: str | None = None,
    rows_path: str | Path = "experiments/rows.yaml",
    params_path: str | Path = "params.yaml",
) -> dict:
    """The training config of one row under one preset (seed excluded)."""
    preset_name = preset or params["preset"]
    sections = preset_section(params, preset_name, params_path)
    rows = load_rows(rows_path)
    if row_id not in rows:
        raise ConfigError(
            f"{rows_path}: unknown row {row_id!r}; define it there or pick one of {sorted(rows)}"
        )
    cfg = copy.deepcopy(sections["train"])
    row = rows[row_id] or {}
    po = row.get("preset_overrides") or {}
    # smoke and embedded-full: embedded's analogs unless a row says otherwise (a key of `train`, so that the train
    # stages depend on it; not part of the run's config)
    family = cfg.pop("variant_of", None)
    row_keys = {**(row.get("overrides") or {}), **(po.get(family) or {} if family else {}), **(po.get(preset_name) or {})}
    for key, value in row_keys.items():
        set_dotted(cfg, key, value, where=f"{rows_path} row {row_id!r}")
    # the model's own recipe (e.g. LV-ViT-M: drop-path 0.2), unless the row sets that key itself
    for key, value, where in model_recipe(cfg, row, row_id, preset_name, rows_path=rows_path, params_path=params_path):
        if key not in row_keys:
            set_dotted(cfg, key, value, where=where)
    models = cfg.pop("models", None) or {}
    if cfg["model"] in models:  # a paper model name -> this preset's timm model (lvvit_s -> lvvit_e, ...)
        cfg["model"] = models[cfg["model"]]
    if row.get("init_from"):  # a fine-tune: starts from the parent row's final weights (same seed)
        parent = row["init_from"]
        cfg["init_from"] = parent
        cfg["init_from_hash"] = config_hash(resolve_run_config(params, parent, preset=preset_name, rows_path=rows_path,
                                                               params_path=params_path))
    cfg["row"] = row_id
    cfg["preset"] = preset_name
    return cfg


def model_recipe(cfg: dict, row: dict, row_id: str, preset_name: str, *, rows_path: str | Path = "experiments/rows.yaml",
                 params_path: str | Path = "params.yaml") -> list[tuple[str, Any, str]]:
    """(dotted key, value, where it is written) of the recipe a row trains with; pops `model_recipes` from cfg.

    The recipe is the row's model's entry in `model_recipes`, or the entry the row names with `recipe:`
    (LV-ViT Table 3 trains DeiT-S variants with LV-ViT's recipe). An entry's `standard_supervision` part
    applies only to class-token cross-entropy rows (LV-ViT supplementary Table 1: MixUp with the standard
    supervision, none with re-labeling or token labeling).
    """
    recipes = cfg.pop("model_recipes", None) or {}
    name = row.get("recipe") or cfg["model"]
    known = set(recipes) | set(cfg.get("models") or {})
    if row.get("recipe") and name not in known:
        raise ConfigError(f"{rows_path} row {row_id!r}: recipe {name!r} is not a model of {params_path} "
                          f"presets.{preset_name}.train ({sorted(known)}); name one of them")
    recipe = dict(recipes.get(name) or {})
    standard = recipe.pop("standard_supervision", None) or {}
    where = f"{params_path} presets.{preset_name}.train.model_recipes.{name}"
    out = [(k, v, where) for k, v in recipe.items()]
    if cfg["supervision"]["kind"] == "ce":
        out += [(k, v, f"{where}.standard_supervision") for k, v in standard.items()]
    return out


def config_hash(cfg: dict) -> str:
    """Stable short hash of a resolved config (the run's identity, seed excluded)."""
    blob = json.dumps({k: v for k, v in cfg.items() if k not in ("seed", "row")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pipeline_rows(params: dict, params_path: str | Path = "params.yaml") -> dict[str, str | None]:
    """Every row `dvc repro` trains -> the row it is fine-tuned from (None: trained from scratch).

    params.yaml `rows` lists rows trained from scratch (stages `train@<row>`), `finetunes` maps a
    fine-tune row to its parent (stages `finetune@<row>`, which depend on the parent's metrics so DVC
    trains the parent first). Parents first, in the order written.
    """
    rows = list(params.get("rows") or [])
    finetunes = params.get("finetunes") or {}
    if not isinstance(finetunes, dict):
        raise ConfigError(f"{params_path}: `finetunes` must map a fine-tune row to its parent row, e.g. "
                          "`finetunes: {lvvit_s_384: lvvit_s_token_labeling}`")
    both = sorted(set(rows) & set(finetunes))
    if both:
        raise ConfigError(f"{params_path}: rows {both} are in both `rows` and `finetunes`; keep each in one")
    out: dict[str, str | None] = {r: None for r in rows}
    for row, parent in finetunes.items():
        if parent not in out and parent not in finetunes:
            raise ConfigError(f"{params_path}: fine-tune {row!r} starts from {parent!r}, which is in neither `rows` nor "
                              "`finetunes`; add the parent (DVC must train it first)")
        out[row] = parent
    return out


def check_row_stage(params: dict, row: str, parent: str | None, *, rows_path: str | Path = "experiments/rows.yaml",
                    params_path: str | Path = "params.yaml") -> None:
    """The stage running `row` (train@ when parent is None, finetune@ otherwise) agrees with rows.yaml's init_from.

    A fine-tune listed under `rows` would have no DVC edge to its parent (it could run first, or on
    stale weights); a parent named differently in params.yaml and rows.yaml is a typo in one of them.
    """
    declared = (load_rows(rows_path).get(row) or {}).get("init_from")
    if declared == parent:
        return
    if parent is None:
        raise ConfigError(f"{params_path}: row {row!r} is fine-tuned from {declared!r} ({rows_path} init_from): list it "
                          f"under `finetunes: {{{row}: {declared}}}` instead of `rows`, so that DVC trains it after its parent")
    if declared is None:
        raise ConfigError(f"{params_path}: `finetunes` gives row {row!r} the parent {parent!r}, but {rows_path} has no "
                          f"init_from for it: move it to `rows`, or add `init_from: {parent}` to the row")
    raise ConfigError(f"{params_path}: `finetunes` gives row {row!r} the parent {parent!r}, {rows_path} says init_from "
                      f"{declared!r}; make them agree")
