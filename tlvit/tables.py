"""The papers' tables as data (`experiments/tables/*.yaml`) and what follows from them for training.

A table lists paper rows; each names a training row of `experiments/rows.yaml`. One row id may appear in
several tables (a configuration trains once), and two row ids that resolve to the same config under a
preset are one training run: `all_rows` lists each config hash once, parents (`init_from`) first.

Table file fields: title, source {paper (a key of CITATIONS), table}, metric, compare (first | previous | none: the default
reference of each row's claimed difference), rows [{row, label, paper, params_m?, paper_top5?, vs?, series?}],
claims [{row, vs, note?}] (extra claimed differences).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tlvit.config import ConfigError, config_hash, load_rows, read_yaml, resolve_run_config

PAPERS = {"lvvit": "LV-ViT", "tlalign": "TL-Align"}
CITATIONS = {  # how reports cite the papers: title, venue, arXiv id
    "lvvit": "Jiang et al., *All Tokens Matter: Token Labeling for Training Better Vision Transformers*, NeurIPS 2021, "
             "arXiv:2104.10858",
    "tlalign": "Xiao et al., *Token-Label Alignment for Vision Transformers*, ICCV 2023, arXiv:2210.06455",
}
COMPARE = ("first", "previous", "none")
TABLES_DIR = Path("experiments/tables")


@dataclass
class Claim:
    """A difference the paper claims: top-1 of `row` minus top-1 of `vs` (paper values from this table)."""

    row: str
    vs: str
    label: str
    vs_label: str
    paper_delta: float | None
    note: str = ""


@dataclass
class Table:
    key: str
    title: str
    source: dict
    metric: str
    rows: list[dict]
    compare: str = "first"
    extra_claims: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "Table":
        d = read_yaml(path)
        compare = d.get("compare", "first")
        if compare not in COMPARE:
            raise ConfigError(f"{path}: compare must be one of {COMPARE}, not {compare!r}")
        return cls(path.stem, d["title"], d["source"], d.get("metric", "top1"), d["rows"], compare, d.get("claims") or [])

    @property
    def caption(self) -> str:
        s = self.source
        return f"{PAPERS.get(s['paper'], s['paper'])} Table {s['table']}: {self.title}"

    @property
    def row_ids(self) -> list[str]:
        return list(dict.fromkeys(r["row"] for r in self.rows))

    def reference(self, i: int) -> str | None:
        """Row id the i-th paper row's claim compares against (its `vs`, else the table's `compare` rule)."""
        r = self.rows[i]
        if r.get("vs"):
            return r["vs"]
        if self.compare == "first" and i > 0:
            return self.rows[0]["row"]
        if self.compare == "previous" and i > 0:
            return self.rows[i - 1]["row"]
        return None

    def claims(self) -> list[Claim]:
        """Every claimed difference of the table: one per row with a reference, then the extra `claims`."""
        by_row = {r["row"]: r for r in self.rows}
        pairs = [(r["row"], self.reference(i), "") for i, r in enumerate(self.rows) if self.reference(i)]
        pairs += [(c["row"], c["vs"], c.get("note", "")) for c in self.extra_claims]
        out = []
        for row, vs, note in pairs:
            a, b = by_row[row], by_row[vs]
            delta = a["paper"] - b["paper"] if a.get("paper") is not None and b.get("paper") is not None else None
            out.append(Claim(row, vs, a["label"], b["label"], None if delta is None else round(delta, 4), note))
        return out


def _order(path: Path) -> tuple:
    """Tables in reading order: by paper, then table number (lvvit_table10 after lvvit_table9)."""
    m = re.fullmatch(r"(.*?)(\d+)", path.stem)
    return (m.group(1), int(m.group(2))) if m else (path.stem, 0)


def load_tables(directory: str | Path = TABLES_DIR) -> list[Table]:
    """Every table file in `directory`, in reading order."""
    return [Table.load(p) for p in sorted(Path(directory).glob("*.yaml"), key=_order)]


def tables_of_row(row: str, tables: list[Table]) -> list[Table]:
    """The tables a row appears in, in reading order."""
    return [t for t in tables if row in t.row_ids]


def experiment_for_row(row: str, preset: str, tables_dir: str | Path = TABLES_DIR, *, params: dict | None = None,
                       rows_path: str | Path = "experiments/rows.yaml",
                       params_path: str | Path = "params.yaml") -> tuple[str, dict[str, str]]:
    """MLflow experiment and tags of a row's runs: one experiment per paper table.

    A run lives in one experiment: the row's first table in reading order (LV-ViT Tables 3..9, then TL-Align
    1, 2, 7, 8), named `tlvit-<preset>-<table key>`. Every table the row belongs to is a tag, so a table's
    runs that live in another table's experiment are one search away (`tags.table.<key> != ""` over all
    experiments): `tables` (comma-separated keys), `table.<key>` = the row's label there, `paper.<key>` =
    the paper's value. With `params`, a table row that resolves to the same config under `preset` (and so
    is trained by this run, see `all_rows`) counts as the row too. A row in no table goes to `tlvit-<preset>`
    with no table tags.
    """
    tables = load_tables(tables_dir)
    same = {row}
    if params is not None:
        try:
            mine = config_hash(resolve_run_config(params, row, preset=preset, rows_path=rows_path, params_path=params_path))
            configs = resolve_rows(params, preset, table_rows(tables), rows_path, params_path)
            same |= {r for r, cfg in configs.items() if config_hash(cfg) == mine}
        except ConfigError:  # tag by row id only; training reports the config error itself
            pass
    entries = [(t, r) for t in tables for r in t.rows if r["row"] in same]
    if not entries:
        return f"tlvit-{preset}", {}
    keys = list(dict.fromkeys(t.key for t, _ in entries))
    tags = {"tables": ",".join(keys), "experiment_table": keys[0]}
    for t, r in entries:
        tags.setdefault(f"table.{t.key}", r["label"])
        if r.get("paper") is not None:
            tags.setdefault(f"paper.{t.key}", str(r["paper"]))
    return f"tlvit-{preset}-{keys[0]}", tags


def table_rows(tables: list[Table]) -> list[str]:
    """Row ids of all tables, each once, in reading order."""
    return list(dict.fromkeys(r for t in tables for r in t.row_ids))


def resolve_rows(params: dict, preset: str, rows: list[str], rows_path: str | Path = "experiments/rows.yaml",
                 params_path: str | Path = "params.yaml") -> dict[str, dict]:
    """Row id -> resolved run config under `preset`."""
    return {r: resolve_run_config(params, r, preset=preset, rows_path=rows_path, params_path=params_path) for r in rows}


def duplicate_configs(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of row ids whose configs hash the same (each group is one training run)."""
    groups: dict[str, list[str]] = {}
    for row, cfg in configs.items():
        groups.setdefault(config_hash(cfg), []).append(row)
    return [g for g in groups.values() if len(g) > 1]


def init_parent(row: str, cfg: dict | None = None, rows: dict | None = None) -> str | None:
    """The row whose final weights `row` starts from (`init_from` in experiments/rows.yaml), or None.

    Read from the resolved config when the engine puts it there, else from the row's entry.
    """
    if cfg is not None and cfg.get("init_from"):
        return cfg["init_from"]
    return ((rows or {}).get(row) or {}).get("init_from")


def all_rows(params: dict, preset: str, tables_dir: str | Path = TABLES_DIR,
             rows_path: str | Path = "experiments/rows.yaml", params_path: str | Path = "params.yaml",
             wanted: list[str] | None = None) -> list[str]:
    """What `rows` must list for `preset` to fill every table (or to train the rows `wanted`): each config hash
    once (its first row id in reading order), every `init_from` parent before its child (also when no table
    lists the parent)."""
    defined = load_rows(rows_path)
    source = tables_dir if wanted is None else "the rows asked for"
    wanted = table_rows(load_tables(tables_dir)) if wanted is None else list(wanted)
    missing = [r for r in wanted if r not in defined]
    if missing:
        raise ConfigError(f"{rows_path}: rows {missing} are used in {source} but not defined")
    configs = resolve_rows(params, preset, wanted, rows_path, params_path)
    seen: dict[str, str] = {}
    order: list[str] = []

    def add(row: str, cfg: dict, chain: tuple[str, ...] = ()) -> None:
        h = config_hash(cfg)
        if h in seen:
            return
        parent = init_parent(row, cfg, defined)
        if parent:
            if parent in chain:
                raise ConfigError(f"{rows_path}: init_from cycle {' -> '.join(chain + (row, parent))}")
            add(parent, configs.get(parent) or resolve_run_config(params, parent, preset=preset, rows_path=rows_path,
                                                                   params_path=params_path), chain + (row,))
        seen[h] = row
        order.append(row)

    for row in wanted:
        add(row, configs[row])
    return order


def split_finetunes(order: list[str], rows_path: str | Path = "experiments/rows.yaml") -> tuple[list[str], dict[str, str]]:
    """all_rows' list -> (params.yaml `rows`: trained from scratch, `finetunes`: row -> parent)."""
    defined = load_rows(rows_path)
    rows, finetunes = [], {}
    for row in order:
        parent = init_parent(row, rows=defined)
        if parent is None:
            rows.append(row)
        elif parent not in rows and parent not in finetunes:  # its parent's config trains under another row id
            raise ConfigError(f"{rows_path}: {row!r} starts from {parent!r}, whose config is trained under another row id; "
                              f"point init_from at that row")
        else:
            finetunes[row] = parent
    return rows, finetunes


def rows_yaml(rows: list[str], finetunes: dict[str, str]) -> tuple[str, str]:
    """The `rows:` and `finetunes:` entries of params.yaml for these rows, in the form `dvc exp run -S` writes back
    (a block list, one row per line; a flow mapping)."""
    return ("rows:" + "".join(f"\n- {r}" for r in rows) if rows else "rows: []",
            "finetunes: {" + ", ".join(f"{k}: {v}" for k, v in finetunes.items()) + "}")


def set_rows_in_params(text: str, rows: list[str], finetunes: dict[str, str] | None = None) -> str:
    """params.yaml text with its top-level `rows:` (and `finetunes:`) replaced; comments elsewhere kept."""
    rows_line, finetunes_line = rows_yaml(rows, finetunes or {})
    text = _set_top_level(text, rows_line, r"\[[^\]]*\]")
    if finetunes is not None:
        text = _set_top_level(text, finetunes_line, r"\{[^}]*\}", after="rows")
    return text


def _set_top_level(text: str, new: str, flow_pattern: str, after: str | None = None) -> str:
    """Replace the top-level key of the line `new` (`key: value`, flow or block style before) by `new`;
    add it after `after:` when missing."""
    key = new.split(":", 1)[0]
    # the value: flow style, or block lines (indented, or `- item` at column 0 as ruamel writes a list in a map)
    pattern = re.compile(rf"^{key}:[ \t]*({flow_pattern}|\n(?:(?:[ \t]+|- ).*\n?)+|.*)$", re.M)
    if pattern.search(text):
        return pattern.sub(lambda m: new + ("\n" if m.group(0).endswith("\n") else ""), text, count=1)
    anchor = re.compile(rf"^{after}:[^\n]*(?:\n(?:[ \t]+|- )[^\n]*)*", re.M) if after else None  # with its block
    m = anchor.search(text) if anchor else None
    if m is None:
        raise ConfigError(f"params.yaml has no top-level `{key}:` to replace")
    return text[:m.end()] + "\n" + new + text[m.end():]


# TL-Align Tables 6 (robustness) and 5 (transfer): columns of several measures per row, so files of their own
# (stages `robustness` and `transfer`), one schema for both
ROBUSTNESS_TABLE = "experiments/robustness.yaml"
TRANSFER_TABLE = "experiments/transfer.yaml"
DETECTION_TABLE = "experiments/detection.yaml"  # stage `detection`, TL-Align Table 4
# The segmentation tables (stage `segmentation`): the same schema, each row naming its decode head too
SEGMENTATION_TABLES = {key: f"experiments/segmentation/{key}.yaml"
                       for key in ("lvvit_slides_table5", "lvvit_slides_table6", "tlalign_table3")}


def load_column_table(path: str | Path) -> dict:
    """experiments/robustness.yaml, transfer.yaml or detection.yaml: a paper table whose rows have `paper` values per column (a
    measure, or a downstream set) and `vs` pairs."""
    try:
        table = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the table ({e})") from None
    if not isinstance(table.get("rows"), list) or not all("row" in r for r in table["rows"]):
        raise ConfigError(f"{path}: `rows` must list {{row, label, paper: {{column: value}}}} entries")
    return table


def downstream_rows(root: str | Path = ".") -> list[str]:
    """Row ids of the downstream tables (segmentation, detection, transfer), each once, in reading order: what a
    preset with `rows_from: downstream` trains, their fine-tunes' parents."""
    paths = [*SEGMENTATION_TABLES.values(), DETECTION_TABLE, TRANSFER_TABLE]
    return list(dict.fromkeys(r["row"] for path in paths for r in load_column_table(Path(root) / path)["rows"]))


def preset_rows(params: dict, preset: str, tables_dir: str | Path = TABLES_DIR,
                rows_path: str | Path = "experiments/rows.yaml", params_path: str | Path = "params.yaml",
                root: str | Path = ".") -> list[str]:
    """all_rows for what `preset` is for (its `rows_from`): `tables` (the default) every table of `tables_dir`,
    `downstream` the downstream tables' rows (their files under `root`)."""
    which = params["presets"][preset].get("rows_from", "tables")
    if which not in ("tables", "downstream"):
        raise ConfigError(f"{params_path}: presets.{preset}.rows_from must be `tables` or `downstream`, not {which!r}")
    wanted = downstream_rows(root) if which == "downstream" else None
    return all_rows(params, preset, tables_dir, rows_path, params_path, wanted=wanted)


def load_segmentation_tables() -> dict[str, dict]:
    """Every segmentation table (SEGMENTATION_TABLES), each row's `head` checked."""
    from tlvit.models.segmenter import HEADS

    tables = {key: load_column_table(path) for key, path in SEGMENTATION_TABLES.items()}
    for key, table in tables.items():
        bad = [r["row"] for r in table["rows"] if r.get("head") not in HEADS]
        if bad:
            raise ConfigError(f"{SEGMENTATION_TABLES[key]}: row {bad[0]!r} needs `head:` one of {', '.join(HEADS)}")
    return tables
