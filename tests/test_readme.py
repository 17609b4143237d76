"""Every command the README shows, run as written from a fresh working directory (tiny sizes appended).

Commands run in README order in one folder, as a new user pasting them would (later ones use the runs of
earlier ones). ``debug=tiny`` is appended to each ``train.py``/``defend.py`` command. Sweeps (``-m``) run in
the slow suite: the default suite runs sweeps through tests/test_sweeps.py, with checks of their content.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
SLOW = (" -m ",)


def readme_commands() -> list[str]:
    """The shell commands of the README's ``bash`` blocks, split at ``&&``, less installs and the test run."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            for command in (c.strip() for c in line.split("&&")):
                if command and not command.startswith(("pip ", "python -m pytest")):
                    commands.append(command)
    return commands


def as_run_here(command: str) -> str:
    """The command with this checkout's scripts and ``debug=tiny`` (the only change to what a user types)."""
    words = shlex.split(command, posix=True)
    script = next((w for w in words if w in ("train.py", "defend.py")), None)
    if script is None:
        return command
    command = command.replace(script, shlex.quote(str(ROOT / script)), 1)
    return command if "debug=tiny" in command else f"{command} debug=tiny"


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_people_need() -> None:
    assert COMMANDS[:2] == ["python train.py", "python defend.py"]  # the quick start's main job
    for needed in ("defenses=", "-m prune.prune_ratio=", "sweep=paper", "_pruning_aware", "backdoor_lab.reporting"):
        assert any(needed in c for c in COMMANDS), needed


@pytest.fixture(scope="session")  # session: its tests share one xdist worker (conftest), not one module
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=pytest.mark.slow) if any(s in c for s in SLOW) else c for c in COMMANDS],
)
def test_readme_command_runs_as_written(command: str, workdir: Path) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-c", as_run_here(command)], cwd=workdir, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if "backdoor_lab.reporting" in command:
        assert "| Initial |" in done.stdout or "| Fine-pruning |" in done.stdout


def test_the_successor_callbacks_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's callbacks example, executed verbatim on a tiny model whose backbone has the named layers."""
    monkeypatch.chdir(tmp_path)  # a user's Trainer writes checkpoints/ into the working folder
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from backdoor_lab.defenses import DefenderData

    block = README.split("### The successors as callbacks", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)

    class Model(L.LightningModule):  # a user's own module: the names are its own (backbone.layer3, ...)
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential()
            self.backbone.add_module("layer3", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
            self.backbone.add_module("layer4", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x).mean(dim=(2, 3)))

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 2, (16,))
    triggered = TensorDataset(x, torch.zeros_like(y), y)
    dm = DefenderData(TensorDataset(x, y), triggered, class_names=["a", "b"], batch_size=8)
    model = Model()
    before = model.backbone.layer3[0].weight.detach().clone()
    namespace = {"L": L, "model": model, "dm": dm}
    exec(code.replace("max_epochs=20", "max_epochs=2, enable_progress_bar=False, logger=False"), namespace)
    nad = namespace["callbacks"][0]
    assert nad.teacher_record["epochs"] == 10 and nad.teacher_state is not None
    assert not torch.equal(model.backbone.layer3[0].weight, before)  # the student was trained
