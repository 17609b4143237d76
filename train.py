"""Train a (backdoored) model, then apply each defense of `defenses` to it.

python train.py [experiment=...] [defenses=[none,fine_tuning,pruning,fine_pruning]] [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from backdoor_lab.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["objective"]  # for sweepers: see `objective` in conf/train.yaml


if __name__ == "__main__":
    main()
