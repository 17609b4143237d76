"""Train a (backdoored) model: python train.py [experiment=...] [key=value ...]."""

import hydra
from omegaconf import DictConfig

from backdoor_lab.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics["clean_acc"]


if __name__ == "__main__":
    main()
