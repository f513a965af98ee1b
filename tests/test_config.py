"""Presets + row overrides resolve once; typos and unknown rows fail naming the file."""
from pathlib import Path

import pytest
import yaml

from tlvit.config import ConfigError, config_hash, load_params, resolve_run_config

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
ROWS = REPO / "experiments" / "rows.yaml"


def test_every_preset_resolves_every_row():
    params = load_params(PARAMS)
    rows = [r for r in params["rows"]]
    for preset in params["presets"]:
        for row in rows:
            cfg = resolve_run_config(params, row, preset=preset, rows_path=ROWS, params_path=PARAMS)
            assert cfg["preset"] == preset and cfg["row"] == row
    tl = resolve_run_config(params, "lvvit_s_token_labeling", preset="imagenet", rows_path=ROWS, params_path=PARAMS)
    assert tl["supervision"]["kind"] == "token_labeling" and tl["augment"]["mix_token"] is True
    assert tl["model"] == "lvvit_s" and tl["img_size"] == 224 and tl["supervision"]["token_weight"] == 0.5


def test_hash_ignores_the_row_name_but_not_the_recipe():
    params = load_params(PARAMS)
    a = resolve_run_config(params, "lvvit_s_baseline", preset="smoke", rows_path=ROWS, params_path=PARAMS)
    b = dict(a, row="another_name_for_the_same_config")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(dict(a, epochs=a["epochs"] + 1))
    emb = resolve_run_config(params, "lvvit_s_baseline", preset="embedded", rows_path=ROWS, params_path=PARAMS)
    assert config_hash(a) != config_hash(emb)


def test_unknown_row_and_typo_name_the_file(tmp_path):
    params = load_params(PARAMS)
    with pytest.raises(ConfigError, match=r"rows.yaml: unknown row 'nope'"):
        resolve_run_config(params, "nope", rows_path=ROWS, params_path=PARAMS)
    bad = tmp_path / "rows.yaml"
    bad.write_text("r:\n  overrides:\n    supervison.kind: ce\n")
    with pytest.raises(ConfigError, match=r"row 'r': unknown config key 'supervison.kind'"):
        resolve_run_config(params, "r", rows_path=bad, params_path=PARAMS)
    with pytest.raises(ConfigError, match="unknown preset 'gpu'"):
        resolve_run_config(params, "lvvit_s_baseline", preset="gpu", rows_path=ROWS, params_path=PARAMS)


def test_imagenet_preset_names_the_missing_dataset(tmp_path, monkeypatch):
    from pipeline.data import main

    params = tmp_path / "params.yaml"
    from tlvit.config import select_preset

    text = select_preset(PARAMS.read_text(), "imagenet")
    params.write_text(text.replace("root: /datasets/imagenet", f"root: {tmp_path}/imagenet"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=rf"{tmp_path}/imagenet/train: dataset split not found.*data.root"):
        main(["--params", str(params)])


def test_imagenet_dataset_json_carries_a_digest_of_the_listing(tmp_path, monkeypatch):
    """Later stages depend on dataset.json alone (dvc.yaml): relabelling an ImageNet image must change it."""
    import json
    import shutil

    from test_score_maps import make_imagefolder

    from pipeline.data import main

    images = make_imagefolder(tmp_path / "imagenet")
    shutil.copytree(images / "train", images / "val")
    params = tmp_path / "params.yaml"
    from tlvit.config import select_preset

    text = select_preset(PARAMS.read_text(), "imagenet")
    params.write_text(text.replace("root: /datasets/imagenet", f"root: {images}"))
    monkeypatch.chdir(tmp_path)

    def written():
        main(["--params", str(params)])
        return json.loads((tmp_path / "data" / "imagenet" / "dataset.json").read_text())

    first = written()
    assert first["splits"] == {"train": 6, "val": 6} and len(first["digest"]) == 32
    assert written()["digest"] == first["digest"]
    (images / "val" / "a" / "0.png").rename(images / "val" / "b" / "moved.png")
    assert written()["digest"] != first["digest"]


def test_every_table_row_is_defined_and_builds_under_every_preset():
    import timm
    import torch

    import tlvit.models  # noqa: F401
    from tlvit.config import load_rows
    from tlvit.report import load_tables
    from tlvit.supervision import Supervision

    params = load_params(PARAMS)
    rows = load_rows(ROWS)
    tables = load_tables(REPO / "experiments" / "tables")
    assert {"lvvit_table3", "lvvit_table6", "tlalign_table2", "tlalign_table7", "tlalign_table8"} <= {t.key for t in tables}
    for table in tables:
        for r in table.rows:
            assert r["row"] in rows, f"{table.key}: row {r['row']!r} is not in experiments/rows.yaml"
            assert isinstance(r.get("paper"), (int, float)), f"{table.key}: {r['row']} has no paper value"
    for preset in params["presets"]:
        for row in rows:
            cfg = resolve_run_config(params, row, preset=preset, rows_path=ROWS, params_path=PARAMS)
            with torch.device("meta"):
                model = timm.create_model(cfg["model"], num_classes=10, img_size=cfg["img_size"],
                                          aux_head=cfg["supervision"]["kind"] == "token_labeling", **cfg["model_kwargs"])
            sup, aug = cfg["supervision"], cfg["augment"]
            Supervision(sup["kind"], 10, model.token_grid, mix=aug["mix"], mix_token=aug["mix_token"], align=sup["align"],
                        align_layers=tuple(sup["align_layers"]), align_target=sup["align_target"])
            assert all(0 <= i < len(model.blocks) for i in sup["align_layers"]), (preset, row)


def test_model_recipe_applies_unless_the_row_sets_the_key(tmp_path):
    params = load_params(PARAMS)
    rows = tmp_path / "rows.yaml"
    rows.write_text("m:\n  overrides: {model: lvvit_m}\nm_dp:\n  overrides: {model: lvvit_m, drop_path: 0.05}\n"
                    "d:\n  overrides: {model: deit_s}\n")
    m = resolve_run_config(params, "m", preset="imagenet", rows_path=rows, params_path=PARAMS)
    assert m["model"] == "lvvit_m" and m["drop_path"] == 0.2 and m["crop_pct"] == 1.0 and "model_recipes" not in m
    assert resolve_run_config(params, "m_dp", preset="imagenet", rows_path=rows, params_path=PARAMS)["drop_path"] == 0.05
    d = resolve_run_config(params, "d", preset="imagenet", rows_path=rows, params_path=PARAMS)
    assert d["model"] == "tlvit_deit_small_patch16_224" and d["ema_decay"] is None
    e = resolve_run_config(params, "d", preset="embedded", rows_path=rows, params_path=PARAMS)
    assert e["model"] == "deit_e" and e["ema_decay"] == params["presets"]["embedded"]["train"]["ema_decay"]


# ----------------------------------------------------------------------------- fine-tunes as their own stages
def test_finetunes_need_their_parent_and_the_right_stage():
    from tlvit.config import check_row_stage, pipeline_rows

    params = {"rows": ["lvvit_s_token_labeling"], "finetunes": {"lvvit_s_token_labeling_384": "lvvit_s_token_labeling"}}
    assert pipeline_rows(params) == {"lvvit_s_token_labeling": None, "lvvit_s_token_labeling_384": "lvvit_s_token_labeling"}
    with pytest.raises(ConfigError, match=r"params.yaml: fine-tune 'x' starts from 'missing', which is in neither"):
        pipeline_rows({"rows": ["a"], "finetunes": {"x": "missing"}})
    with pytest.raises(ConfigError, match=r"rows \['a'\] are in both"):
        pipeline_rows({"rows": ["a"], "finetunes": {"a": "a"}})
    with pytest.raises(ConfigError, match=r"must map a fine-tune row to its parent"):
        pipeline_rows({"rows": ["a"], "finetunes": ["a"]})
    check = lambda row, parent: check_row_stage(params, row, parent, rows_path=ROWS)  # noqa: E731
    check("lvvit_s_token_labeling_384", "lvvit_s_token_labeling")
    check("lvvit_s_baseline", None)
    with pytest.raises(ConfigError, match=r"list it under `finetunes: \{lvvit_s_token_labeling_384: lvvit_s_token_labeling\}`"):
        check("lvvit_s_token_labeling_384", None)  # in `rows`: no DVC edge to the parent
    with pytest.raises(ConfigError, match=r"no init_from for it"):
        check("lvvit_s_baseline", "lvvit_s_relabel")
    with pytest.raises(ConfigError, match=r"says init_from 'lvvit_s_token_labeling'; make them agree"):
        check("lvvit_s_token_labeling_384", "lvvit_s_baseline")


def test_finetune_stage_runs_what_train_runs_after_its_parent():
    """dvc.yaml's finetune stage is the train stage plus the parent's metrics (the DVC edge), nothing less."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    train, finetune = stages["train"]["do"], stages["finetune"]["do"]
    sub = lambda deps: [d.replace("${item}", "${key}") if isinstance(d, str) else d for d in deps]  # noqa: E731
    assert finetune["deps"] == sub(train["deps"]) + ["metrics/${preset}/rows/${item}.json"]
    assert finetune["params"][:3] == train["params"][:3]
    assert finetune["cmd"] == "python -m pipeline.train --row ${key} --parent ${item}"
    as_key = lambda entries: [{k.replace("${item}", "${key}"): v for k, v in e.items()} for e in entries]  # noqa: E731
    for kind in ("outs", "metrics", "plots"):  # the same outputs, persisted and cached alike
        assert [{k: {**v, "persist": v.get("persist")}} for e in finetune[kind] for k, v in e.items()] == \
            [{k: {**v, "persist": v.get("persist")}} for e in as_key(train[kind]) for k, v in e.items()], kind


def test_dvc_orders_a_finetune_after_its_parent(tmp_path):
    """Real DVC on a copy of the repository: the fine-tune's stage depends on its parent's stage."""
    import json
    import sys

    from tests.repo_copy import committed_copy, sh

    edit = lambda t: t.replace("finetunes: {}", "finetunes: {lvvit_s_token_labeling_384: lvvit_s_token_labeling}")  # noqa: E731
    repo, env = committed_copy(tmp_path, edit)
    dot = sh([sys.executable, "-m", "dvc", "dag", "--dot", "finetune@lvvit_s_token_labeling_384"], repo, env).stdout
    assert '"train@lvvit_s_token_labeling" -> "finetune@lvvit_s_token_labeling_384"' in dot
    status = sh([sys.executable, "-m", "dvc", "status", "--json", "finetune@lvvit_s_token_labeling_384"], repo, env).stdout
    assert "finetune@lvvit_s_token_labeling_384" in json.loads(status[status.index("{"):])


@pytest.mark.parametrize("overrides,message", [
    ({"lr": "1e-3"}, r"lr is a string \('1e-3'\); the recipe's value is a number \(0.001\) \(YAML reads 1e-3 as a string: write 1.0e-3\)"),
    ({"epochs": 2.5}, r"epochs must be a whole number \(the recipe has 30\), not 2.5"),
    ({"augment.mix_token": "yes"}, r"augment.mix_token is a string \('yes'\); the recipe's value is a boolean"),
    ({"crop_scale": 0.5}, r"crop_scale is a number \(0.5\); the recipe's value is a list"),
])
def test_override_types_are_checked_when_the_config_is_resolved(tmp_path, overrides, message):
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump({"r": {"overrides": overrides}}))
    with pytest.raises(ConfigError, match=message) as e:
        resolve_run_config(load_params(REPO / "params.yaml"), "r", preset="embedded", rows_path=rows)
    assert str(e.value).startswith(f"{rows} row 'r': ")  # the file and the row, then the key and the fix
    ok = {"lr": 1.0e-3, "epochs": 2.0, "augment.mix_token": True, "crop_scale": [0.5, 1.0]}[next(iter(overrides))]
    rows.write_text(yaml.safe_dump({"r": {"overrides": {next(iter(overrides)): ok}}}))
    resolve_run_config(load_params(REPO / "params.yaml"), "r", preset="embedded", rows_path=rows)


def test_defaults_merge_under_every_preset_and_the_stages_depend_on_them(tmp_path):
    from tlvit.config import load_params, merged

    assert merged({"a": 1, "s": {"x": 1, "y": 2}}, {"s": {"y": 3}, "b": 4}) == {"a": 1, "s": {"x": 1, "y": 3}, "b": 4}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    for name, preset in params["presets"].items():
        assert preset["train"]["supervision"]["pooling"] == "logits" and preset["train"]["label_smoothing"] == 0.1, name
    assert "supervision" not in raw["presets"]["imagenet"]["train"]  # written once, in defaults
    # a stage reading a preset's section also depends on that section's defaults (else editing them re-runs nothing)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params_deps = [p for p in (stage.get("do", stage).get("params") or []) if isinstance(p, str)]
        for section in raw["defaults"]:
            if f"presets.${{preset}}.{section}" in params_deps:
                assert f"defaults.{section}" in params_deps, f"dvc.yaml stage {name}: add `defaults.{section}` to its params"
    # a preset's own value wins over the default
    text = (REPO / "params.yaml").read_text().replace("      lr_scale: 8.0 ", "      label_smoothing: 0.2\n      lr_scale: 8.0 ", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml")["presets"]["embedded"]["train"]["label_smoothing"] == 0.2


def test_every_preset_has_every_section_a_stage_reads():
    """DVC refuses a stage whose `presets.${preset}.<section>` param is missing (even `{}` will do), so every preset
    and the base it names carry every section a stage lists."""
    raw = yaml.safe_load(PARAMS.read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wanted = {p.split(".")[-1] for stage in stages.values() for p in (stage.get("do", stage).get("params") or [])
              if isinstance(p, str) and p.startswith(("presets.${preset}.", "presets.${base}."))}
    assert {"train", "transfer", "segmentation", "detection", "data"} <= wanted
    missing = {name: sorted(wanted - set(preset)) for name, preset in raw["presets"].items() if wanted - set(preset)}
    assert not missing, f"params.yaml: presets without these sections: {missing}"


def test_variants_of_embedded_take_its_row_analogs_unless_they_set_their_own():
    from tlvit.config import load_params, resolve_run_config

    params = load_params(REPO / "params.yaml")
    rows = REPO / "experiments" / "rows.yaml"
    emb, full = (resolve_run_config(params, "deit_t_cutmix", preset=p, rows_path=rows) for p in ("embedded", "embedded-full"))
    assert emb["model_kwargs"] == full["model_kwargs"] == {"embed_dim": 36, "num_heads": 1}
    assert "variant_of" not in full  # where the analogs come from is not part of the run's config
    ft = resolve_run_config(params, "lvvit_s_token_labeling_384", preset="embedded-full", rows_path=rows)
    assert ft["img_size"] == 112 and ft["epochs"] == 2  # embedded's analog, the variant's own epochs


def test_every_headline_claim_names_rows_that_resolve_under_every_embedded_preset():
    """experiments/headline.yaml (the pre-registered claims): each pair's rows exist and build a config."""
    import yaml

    from tlvit.config import load_params, resolve_run_config

    spec = yaml.safe_load(open("experiments/headline.yaml"))
    params = load_params("params.yaml")
    assert len(spec["claims"]) == 5 and spec["criteria"]["seeds"] >= 5
    for claim in spec["claims"]:
        for better, worse in claim["pairs"]:
            for row in (better, worse):
                for preset in ("embedded", "embedded-tune"):
                    assert resolve_run_config(params, row, preset=preset)["row"] == row


@pytest.mark.parametrize("name", ["params.yaml", "experiments/rows.yaml"])
def test_dvc_exp_run_set_param_round_trips_both_files(tmp_path, name):
    """`dvc exp run -S` writes the file back through DVC's own `apply_overrides` (ruamel): with no override it
    leaves it byte-identical (no merges to expand, lists and comments as DVC writes them), and a value set is
    the only change, and is kept (an alias of its node further down would silently restore the old value)."""
    import difflib

    from dvc.utils.hydra import apply_overrides

    from tlvit.config import load_params, resolve_run_config

    original = (REPO / name).read_text()
    path = tmp_path / Path(name).name
    path.write_text(original)
    apply_overrides(path, [])
    assert path.read_text() == original
    if name == "params.yaml":
        apply_overrides(path, ["presets.embedded.data.train=4000", "presets.embedded.train.epochs=20"])
        params = load_params(path)
        assert params["presets"]["embedded"]["data"]["train"] == 4000
        assert params["presets"]["embedded-full"]["data"]["train"] == 4000  # a variant takes its base's values
        assert params["presets"]["smoke"]["data"]["train"] == 600  # unless it sets its own
        assert params["presets"]["embedded-tune"]["train"]["epochs"] == 20
    else:
        apply_overrides(path, ["+lvvit_s_baseline.overrides.augment.mix=cutmix",
                               "+lvvit_s_token_labeling.overrides.augment.mix_token=false"])  # beats the dotted key above it
        cfg = resolve_run_config(load_params(REPO / "params.yaml"), "lvvit_s_baseline", rows_path=path)
        assert cfg["augment"]["mix"] == "cutmix" and cfg["augment"]["mix_token"] is False
        tl = resolve_run_config(load_params(REPO / "params.yaml"), "lvvit_s_token_labeling", rows_path=path)
        assert tl["augment"]["mix_token"] is False
    changed = [line for line in difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 1 <= len(changed) <= 4, changed


def test_the_chosen_preset_names_its_base_and_tlvit_preset_sets_both(tmp_path):
    from tlvit.cli import main
    from tlvit.config import ConfigError, load_params

    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text.replace("\npreset: embedded\n", "\npreset: tiny-imagenet\n", 1))
    with pytest.raises(ConfigError, match="is a variant of 'imagenet': set `base: imagenet`"):
        load_params(path)
    path.write_text(text.replace("\npreset: embedded\n", "\npreset: imagenet\n", 1))
    with pytest.raises(ConfigError, match="'imagenet' is no variant: set `base: imagenet`"):
        load_params(path)
    assert main(["preset", "embedded-full", "--params", str(path)]) == 0
    assert (load_params(path)["preset"], load_params(path)["base"]) == ("embedded-full", "embedded")
    assert main(["preset", "imagenet", "--params", str(path)]) == 0
    assert load_params(path)["base"] == "imagenet"
    assert main(["preset", "tiny-imagenet", "--params", str(path)]) == 0
    assert load_params(path)["base"] == "imagenet"


def test_read_yaml_sees_every_edit_and_hands_out_copies(tmp_path):
    """Parsed once per content (collecting a row resolved rows.yaml ~50 times): an edit of the same size right
    after the first read is seen, and a caller mutating the result does not change the next read."""
    from tlvit.config import read_yaml

    f = tmp_path / "rows.yaml"
    f.write_text("a: {x: 1}\n")
    first = read_yaml(f)
    first["a"]["x"] = 99
    assert read_yaml(f) == {"a": {"x": 1}}
    f.write_text("a: {x: 2}\n")
    assert read_yaml(f) == {"a": {"x": 2}}


def test_an_optional_key_is_carried_only_by_the_rows_that_set_it():
    """augment.switch_prob (TL-Align Table 9's TransMix recipe switches to CutMix with p 0.8): absent from every
    other row's config (their hashes stay), used by the mixing where set, and typos still fail."""
    import torch

    from tlvit.config import set_dotted
    from tlvit.mixing import mix_images
    from tlvit.supervision import Supervision

    params = load_params("params.yaml")
    recipe = resolve_run_config(params, "deit_s_recipe_transmix", preset="embedded")
    plain = resolve_run_config(params, "deit_s_mixup_cutmix", preset="embedded")
    assert recipe["augment"]["switch_prob"] == 0.8 and "switch_prob" not in plain["augment"]
    sup = Supervision.from_config(recipe, 10, (8, 8))
    assert sup.switch_prob == 0.8 and Supervision.from_config(plain, 10, (8, 8)).switch_prob == 0.5
    x = torch.rand(4, 3, 64, 64)
    kinds = lambda p: [mix_images(x, "mixup_cutmix", (8, 8), torch.Generator().manual_seed(i), switch_prob=p).kind  # noqa: E731
                       for i in range(400)]
    assert abs(kinds(0.8).count("cutmix") / 400 - 0.8) < 0.06 and abs(kinds(0.5).count("cutmix") / 400 - 0.5) < 0.08
    with pytest.raises(ConfigError, match="unknown config key 'augment.switch_probs'"):
        set_dotted(dict(plain), "augment.switch_probs", 0.8, where="test")
