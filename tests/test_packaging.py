"""A non-editable ``pip install .`` carries the configs and console scripts, and runs from any folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def test_dependencies_are_ranges_never_pins() -> None:
    """The callback installs into other projects: an exact torch pin would replace their torch."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), flags=re.M)
    for name in ("torch", "torchvision", "lightning"):
        (spec,) = [d for d in deps if re.split(r"[<>=!~ ]", d)[0] == name]
        assert "==" not in spec and ">=" in spec, spec


@pytest.fixture(scope="session")  # session: its tests share one xdist worker (conftest), not one module
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed (without its dependencies, which this environment has) into a folder."""
    wheels = tmp_path_factory.mktemp("wheels")
    source = tmp_path_factory.mktemp("checkout")  # a copy: building writes build/ into the source tree
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("backdoor_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "backdoor_lab/conf/train.yaml" in names and "backdoor_lab/conf/defense/fine_pruning.yaml" in names
    assert "backdoor_lab/conf/experiment/face_sunglasses_pruning_aware.yaml" in names
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def test_console_script_trains_and_defends_from_any_folder(installed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed), "WANDB_MODE": "offline"}
    script = installed / "bin" / "backdoor-lab-train"
    assert script.is_file()
    done = subprocess.run(
        [sys.executable, str(script), "debug=tiny", "defenses=[fine_pruning]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = (tmp_path / "outputs" / "train" / "signs-badnets").iterdir()
    assert (job / "defense" / "fine_pruning" / "metrics.json").is_file()
    assert "path: backdoor_lab.conf" in (job / ".hydra" / "hydra.yaml").read_text()  # the package's configs
    where = subprocess.run(
        [sys.executable, "-c", "import backdoor_lab; print(backdoor_lab.CONF_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(installed / "backdoor_lab" / "conf")  # the wheel's copy, not the checkout


def test_light_modules_do_not_import_lightning() -> None:
    """The data cache and the README's table command start in a fraction of Lightning's import time."""
    code = (
        "import sys, backdoor_lab.data.base, backdoor_lab.reporting.side_by_side;"
        "print(sorted(m for m in ('lightning', 'wandb', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import backdoor_lab
    import backdoor_lab.reporting as reporting

    assert set(reporting.__all__) == set(reporting._HOMES) and all(getattr(reporting, n) for n in reporting.__all__)
    assert backdoor_lab.FinePruningCallback.__name__ == "FinePruningCallback"
