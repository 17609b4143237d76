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


@pytest.fixture(scope="module")
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
