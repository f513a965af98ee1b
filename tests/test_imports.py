"""The model/label/loss/training modules run without the pipeline extras (GPU machines ship their own torch)."""
import subprocess
import sys
import textwrap


def test_core_modules_import_without_dvc_mlflow_submitit(tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('mlflow', 'dvc', 'submitit'):
                    raise ModuleNotFoundError('blocked: ' + name)  # what 'not installed' raises
        sys.meta_path.insert(0, Block())
    """))
    code = ("import tlvit.models, tlvit.train, tlvit.engine, tlvit.supervision, tlvit.losses, tlvit.labels.annotator, "
            "tlvit.labels.geometry, tlvit.labels.score_maps, tlvit.data.datasets, tlvit.tracking\n"
            "from tlvit.tracking import open_tracker\n"
            "t = open_tracker('" + str(tmp_path / "run") + "', 'e', 'r', {}, {})\n"
            "assert type(t).__name__ == 'NullTracker', t\n"
            "import sys; assert 'mlflow' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_import_tlvit_alone_registers_the_models_with_timm():
    # a fresh interpreter: nothing but `import tlvit` may have registered them
    code = ("import timm, tlvit\n"
            "m = timm.create_model('lvvit_s', pretrained=False)\n"
            "assert type(m).__name__ == 'LvViT', type(m)\n"
            "assert m.pretrained_cfg['crop_pct'] == 0.9 and timm.create_model('tlvit_deit_tiny_patch16_224').num_classes == 1000\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
