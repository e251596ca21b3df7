"""A regular (non-editable) install works away from the checkout (issue #15): the wheel ships ``recipes/`` and
``data_specs/`` as ``nvembed/_bundled/``, and the ``nvembed-train`` / ``nvembed-check-recipe`` console scripts find
them, the smoke recipe's tokenizer and the export's model code from any working directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # ~15 s: one pip build + install, a dry run, a 1-step smoke run
BUNDLED = ("recipes", "data_specs")


def _files(root):
    out = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out.update(os.path.relpath(os.path.join(d, f), root) for f in files if not f.endswith(".pyc"))
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target SITE`` of the sources, without network or build isolation: (SITE, the environment
    that puts SITE first on the path)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info beside the sources it is given
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "build_bundle.py", "MANIFEST.in"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "nvembed"), src / "nvembed", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUNDLED:  # the build hook copies them into the wheel: a link saves copying 23 MB twice
        (src / name).symlink_to(os.path.join(REPO, name))
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site))  # before the checkout's editable install on sys.path
    return site, env


def _run(installed, cwd, script, *args):
    """The console script run in ``cwd``, a folder outside the checkout."""
    site, env = installed
    return subprocess.run([str(site / "bin" / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_bundles_every_recipe_and_spec(installed):
    site, _ = installed
    for name in BUNDLED:
        assert _files(site / "nvembed" / "_bundled" / name) == _files(os.path.join(REPO, name)), name


def test_check_recipe_script_uses_the_installed_bundle(installed, tmp_path):
    site, _ = installed
    r = _run(installed, tmp_path, "nvembed-check-recipe", "smok")
    assert r.returncode == 2, r.stderr
    bundled = site / "nvembed" / "_bundled" / "recipes"
    assert r.stderr.strip() == (f"nvembed: config error: No recipe 'smok' (looked for smok.yaml in {bundled}); "
                                f"recipes: demo, nvembed_v1, nvembed_v2, smoke")
    assert os.listdir(tmp_path) == []


def test_train_dry_run_from_another_directory(installed, tmp_path):
    r = _run(installed, tmp_path, "nvembed-train", "--config-name=smoke", "dry_run=true",
             f"output_dir={tmp_path / 'dry'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 dataset rows: 6 ok" in r.stdout and "demo/medquad.yaml" in r.stdout
    assert os.listdir(tmp_path) == []  # nothing written, not even Hydra's outputs/


def test_smoke_run_and_export_from_another_directory(installed, tmp_path):
    """A real (1-step) run: the recipe's relative tokenizer path, the data specs and the exported model's code all
    come from the installed package."""
    site, _ = installed
    out = tmp_path / "run"
    r = _run(installed, tmp_path, "nvembed-train", "--config-name=smoke", f"output_dir={out}", "stages=[stage1]",
             "stage_defs.stage1.max_steps=1", "logging.progress_bar=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path) == ["run"]
    with open(out / "config.yaml") as f:
        tokenizer = [line.split(":", 1)[1].strip() for line in f if line.strip().startswith("tokenizer:")]
    assert tokenizer == [str(site / "nvembed" / "_bundled" / "recipes" / "assets" / "tiny-tokenizer")]
    with open(out / "final" / "config.json") as f:
        auto_map = json.load(f)["auto_map"]
    code = {v.split(".")[0] + ".py" for v in auto_map.values()}
    assert code and all((out / "final" / c).is_file() for c in code), (code, os.listdir(out / "final"))
