"""Configs as data: `params.yaml` presets + `experiments/rows.yaml` overrides, merged once.

A run's resolved config is a plain dict (saved next to its checkpoints); its identity is the hash of
that dict without the seed, so a row that appears in several tables trains once.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params/rows file that cannot be used; the message names the file and the fix."""


_PARSED: dict[str, Any] = {}  # text digest -> parsed document: resolving every row reads rows.yaml ~50 times


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file, naming the file in any error (a fresh copy each call; a text already seen is not parsed
    again: keyed by its content, so an edit is always seen, however fast it follows)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    text = path.read_text()
    key = hashlib.sha1(text.encode()).hexdigest()
    if key not in _PARSED:
        try:
            _PARSED[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}); fix the syntax") from e
    return copy.deepcopy(_PARSED[key])


def load_params(path: str | Path = "params.yaml") -> dict:
    """The whole params file, each preset's sections resolved: `defaults`, then the sections of the preset it is a
    `variant_of` (one level), then its own (later values win, mappings merged key by key). The top-level `base`
    must name the chosen preset's base (itself when it varies none): DVC tracks the base's sections through it."""
    params = read_yaml(path)
    if not isinstance(params, dict) or "presets" not in params:
        raise ConfigError(f"{path}: expected a mapping with a `presets` section")
    defaults, raw = params.get("defaults") or {}, params["presets"]
    resolved = {}
    for name, preset in raw.items():
        base_name = preset.get("variant_of")
        if base_name is not None and (base_name not in raw or raw[base_name].get("variant_of")):
            raise ConfigError(f"{path}: presets.{name}.variant_of: {base_name!r} must be a preset that is no variant "
                              f"itself; choose one of {sorted(n for n, p in raw.items() if not p.get('variant_of'))}")
        base = raw[base_name] if base_name else {}
        out = {}
        for key in dict.fromkeys([*defaults, *base, *preset]):
            if key == "variant_of":
                continue
            layers = [layer[key] for layer in (defaults, base, preset) if key in layer]
            out[key] = (functools.reduce(merged, layers, {}) if all(isinstance(v, dict) for v in layers)
                        else copy.deepcopy(layers[-1]))
        if base_name:
            out["variant_of"] = base_name
        resolved[name] = out
    params["presets"] = resolved
    chosen = params.get("preset")
    if chosen in raw:
        want = raw[chosen].get("variant_of") or chosen
        if params.get("base", chosen) != want:  # a file without variants may leave `base` out
            raise ConfigError(f"{path}: `base: {params.get('base')}` but preset {chosen!r} "
                              + (f"is a variant of {want!r}" if want != chosen else "is no variant")
                              + f": set `base: {want}` (or run `tlvit preset {chosen}`, which sets both)")
    return params


def select_preset(text: str, name: str) -> str:
    """params.yaml text with `preset: <name>` and `base:` set to the preset it is a variant of (itself otherwise);
    the rest of the text, comments included, unchanged."""
    import re

    presets = (yaml.safe_load(text) or {}).get("presets") or {}
    if name not in presets:
        raise ConfigError(f"params.yaml: unknown preset {name!r}; choose one of {sorted(presets)}")
    base = presets[name].get("variant_of") or name
    text, found = re.subn(r"^preset:.*$", f"preset: {name}", text, count=1, flags=re.M)
    if not found:
        raise ConfigError("params.yaml has no top-level `preset:` line")
    if re.search(r"^base:.*$", text, flags=re.M):
        return re.sub(r"^base:.*$", f"base: {base}", text, count=1, flags=re.M)
    return re.sub(r"^preset:.*$", lambda m: f"{m.group(0)}\nbase: {base}", text, count=1, flags=re.M)


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


ROW_KEYS = ("overrides", "preset_overrides", "init_from", "recipe")


def load_rows(path: str | Path = "experiments/rows.yaml") -> dict:
    """Row id -> {overrides, preset_overrides, init_from, recipe}; every key is training-relevant (DVC re-trains a
    row when its entry changes, so what describes a row is a YAML comment, which it does not track)."""
    rows = read_yaml(path) or {}
    if not isinstance(rows, dict):
        raise ConfigError(f"{path}: expected a mapping of row id -> row")
    for row_id, row in rows.items():
        unknown = sorted(set(row or {}) - set(ROW_KEYS))
        if unknown:
            hint = " (describe a row in a YAML comment: DVC would re-train it for every edit of a key)" \
                if "description" in unknown else ""
            raise ConfigError(f"{path} row {row_id!r}: unknown keys {unknown}; a row has {list(ROW_KEYS)}{hint}")
    return rows


def flat_overrides(overrides: dict | None, prefix: str = "") -> dict:
    """Dotted keys from overrides written as dotted keys, as nested mappings, or both (`dvc exp run -S` adds nested
    ones: `-S '+experiments/rows.yaml:<row>.overrides.augment.mix=cutmix'`, appended below the row's keys, so it
    wins over a dotted `augment.mix` above it: the later entry wins). An empty mapping stays a value."""
    out = {}
    for key, value in (overrides or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_overrides(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


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


# Keys a row may set that the recipes leave out (absent means this default): written into `defaults`, they would
# change every row's config hash and mark all metrics stale; only the rows that set one carry it.
OPTIONAL_KEYS = {"augment.switch_prob": 0.5}  # DeiT's MixUp/CutMix switch: CutMix's share of the batches


def set_dotted(cfg: dict, dotted: str, value: Any, *, where: str) -> None:
    """cfg['a']['b'] = value for dotted='a.b'; the key must already exist (typos fail loudly), or be one of
    OPTIONAL_KEYS, and `value` be of the kind of the value it replaces (`check_type`)."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            # model_kwargs is open-ended: constructor arguments are checked by the model itself
            if parts[0] == "model_kwargs" and i == len(parts) - 1 and isinstance(node, dict):
                break
            if dotted in OPTIONAL_KEYS and i == len(parts) - 1 and isinstance(node, dict):
                check_type(dotted, value, OPTIONAL_KEYS[dotted], where=where)
                node[part] = value
                return
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
    # smoke and embedded-full: embedded's analogs unless a row says otherwise (the train stages depend on `base`)
    family = sections.get("variant_of")
    row_keys = {**flat_overrides(row.get("overrides")), **(flat_overrides(po.get(family)) if family else {}),
                **flat_overrides(po.get(preset_name))}
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
