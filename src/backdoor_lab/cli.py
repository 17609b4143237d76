"""Console scripts: ``backdoor-lab-train`` and ``backdoor-lab-defend`` (``train.py`` / ``defend.py`` of a checkout).

They read the configs shipped in the package, so they work from any folder after ``pip install backdoor_lab``.
Each returns the job's objective to a Hydra sweeper (see ``objective`` in the config).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from backdoor_lab.pipeline import defend, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_main(cfg: DictConfig) -> float:
    """Train a (backdoored) model, then apply each defense of ``defenses`` to it."""
    return train(cfg)["objective"]


@hydra.main(version_base="1.3", config_path="conf", config_name="defend")
def defend_main(cfg: DictConfig) -> float:
    """Defend a checkpoint (``ckpt_path``, or the newest training run whose training config matches)."""
    return defend(cfg)["objective"]
