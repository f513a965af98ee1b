"""Every ImageNet row trains the authors' recipe: each value of experiments/authors_recipes.yaml, or the registered choice."""
import pytest
import yaml

from tlvit.config import ConfigError, load_params, read_yaml, resolve_run_config
from tlvit.deviations import DEVIATIONS
from tlvit.train import lr_for

from repo_copy import REPO

TABLE = read_yaml(REPO / "experiments" / "authors_recipes.yaml")["recipes"]
BY_KEY = {d.key: d for d in DEVIATIONS}


def settings(row: str) -> dict:
    """The row's entry with its `base` entries' settings under it."""
    entry = dict(TABLE[row])
    base = entry.pop("base", None)
    return {**(settings(base) if base else {}), **entry}


def tlvit_value(cfg: dict, key: str):
    if key == "lr_at_batch":
        return lr_for(cfg, cfg["batch_size"])
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-9)
    return a == b


@pytest.mark.parametrize("row", sorted(TABLE))
def test_imagenet_row_matches_the_authors_recipe(row):
    cfg = resolve_run_config(load_params(REPO / "params.yaml"), row, preset="imagenet",
                             rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml")
    wrong = []
    for key, entry in settings(row).items():
        if entry["value"] == "unknown":
            continue
        ours, theirs = tlvit_value(cfg, key), entry["value"]
        dev = BY_KEY.get(entry.get("deviation"))
        if entry.get("deviation") and dev is None:
            wrong.append(f"{key}: deviation {entry['deviation']!r} is not in tlvit/deviations.py")
        elif dev is not None and dev.default == "other":
            if same(ours, theirs):  # a registered departure that is not taken
                wrong.append(f"{key}: {ours!r} is the authors' value, but deviation {dev.key!r} chooses the other")
        elif not same(ours, theirs):
            wrong.append(f"{key}: tlvit {ours!r}, authors {theirs!r} ({entry['source']})")
    assert not wrong, f"row {row} under imagenet:\n" + "\n".join(wrong)


@pytest.mark.parametrize("dev", [d for d in DEVIATIONS if d.recipe_row], ids=lambda d: d.key)
def test_recipe_conflicts_take_their_registered_value(dev):
    """The row carrying a recipe conflict has the registered choice, and the table has the code's side of it."""
    cfg = resolve_run_config(load_params(REPO / "params.yaml"), dev.recipe_row, preset="imagenet",
                             rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml")
    keys = [k.strip() for k in dev.switch.split(",")]
    chosen = dev.original_value if dev.default == "original" else dev.other_value
    want = [v.strip() for v in str(chosen).split(",")]
    assert [str(tlvit_value(cfg, k)) for k in keys] == want
    assert any(e.get("deviation") == dev.key for e in settings(dev.recipe_row).values())


def test_a_row_can_train_with_another_models_recipe(tmp_path):
    """LV-ViT Table 3's DeiT-shaped steps train with LV-ViT-S's recipe; ce rows get its MixUp, others not."""
    params = load_params(REPO / "params.yaml")
    rows = REPO / "experiments" / "rows.yaml"
    step2 = resolve_run_config(params, "deit_s_depth16", preset="imagenet", rows_path=rows)
    lvvit = resolve_run_config(params, "lvvit_s_baseline", preset="imagenet", rows_path=rows)
    deit = resolve_run_config(params, "deit_s_vanilla", preset="imagenet", rows_path=rows)
    recipe_keys = ("ema_decay", "crop_pct", "repeated_aug", "cooldown_epochs", "transform_order", "augment")
    assert all(step2[k] == lvvit[k] for k in recipe_keys)
    assert deit["ema_decay"] is None and deit["augment"]["mix"] == "none" and deit["repeated_aug"] == 3
    assert lvvit["augment"]["mix"] == "mixup"
    tl = resolve_run_config(params, "lvvit_s_token_labeling", preset="imagenet", rows_path=rows)
    assert tl["augment"]["mix"] == "none"  # "we do not use MixUp when ReLabel or token labeling is used"
    tmp = tmp_path / "rows.yaml"
    tmp.write_text(yaml.safe_dump({"deit_s_depth16": {"recipe": "resnet50", "overrides": {"model": "deit_s"}}}))
    with pytest.raises(ConfigError, match="recipe 'resnet50' is not a model"):
        resolve_run_config(params, "deit_s_depth16", preset="imagenet", rows_path=tmp)


# the recipe's keys (what the authors' command fixes for every run of a model family), as opposed to what a table's
# row varies (supervision, mixing, architecture knobs): every ImageNet row has its family's values unless it sets one
RECIPE_KEYS = ("epochs", "cooldown_epochs", "batch_size", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr",
               "drop_path", "label_smoothing", "rand_augment", "reprob", "color_jitter", "train_interpolation",
               "transform_order", "hflip", "crop_scale", "crop_ratio", "crop_pct", "img_size", "ema_decay", "repeated_aug")


def family_reference(params: dict, row: str, spec: dict) -> str:
    """The authors'-table row whose recipe `row` trains with: its own entry, else its model's, else its family's."""
    if row in TABLE:
        return row
    model = spec.get("recipe") or {**(spec.get("overrides") or {})}.get("model") or params["presets"]["imagenet"]["train"]["model"]
    by_model = {"lvvit_t": "lvvit_t_token_labeling", "lvvit_s": "lvvit_s_token_labeling", "lvvit_m": "lvvit_m_token_labeling",
                "lvvit_l": "lvvit_l_token_labeling", "deit_t": "deit_t_tlalign", "deit_s": "deit_s_tlalign",
                "deit_b": "deit_s_tlalign", "swin_t": "swin_t_mixup_cutmix", "pvt_t": "pvt_t_mixup_cutmix", "swin_s": "swin_s_mixup_cutmix",
                "swin_b": "swin_b_mixup_cutmix", "pvt_s": "pvt_s_mixup_cutmix"}
    return by_model[model]


def test_every_imagenet_row_trains_its_familys_recipe():
    params = load_params(REPO / "params.yaml")
    rows_path = REPO / "experiments" / "rows.yaml"
    rows = read_yaml(rows_path)
    wrong = []
    for row, spec in rows.items():
        ref = family_reference(params, row, spec)
        declared = set(spec.get("overrides") or {}) | set((spec.get("preset_overrides") or {}).get("imagenet") or {})
        cfg = resolve_run_config(params, row, preset="imagenet", rows_path=rows_path, params_path=REPO / "params.yaml")
        want = settings(ref)
        for key in RECIPE_KEYS:
            entry = want.get(key)
            if key in declared or entry is None or entry["value"] == "unknown":
                continue
            dev = BY_KEY.get(entry.get("deviation"))
            if dev is not None and dev.default == "other":
                continue  # checked against the registry above
            if not same(tlvit_value(cfg, key), entry["value"]):
                wrong.append(f"{row} ({ref}'s recipe): {key} = {tlvit_value(cfg, key)!r}, authors {entry['value']!r}")
    assert not wrong, "\n".join(wrong)
