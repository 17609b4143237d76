"""Defend a checkpoint: python defend.py [ckpt_path=...] [defenses=[...]] [-m prune.prune_ratio=0.2,0.5]."""

import hydra
from omegaconf import DictConfig

from backdoor_lab.pipeline import defend


@hydra.main(version_base="1.3", config_path="conf", config_name="defend")
def main(cfg: DictConfig) -> float:
    return defend(cfg)["objective"]  # for sweepers: see `objective` in conf/defend.yaml


if __name__ == "__main__":
    main()
