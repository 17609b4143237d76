"""Train a (backdoored) model, then apply each defense of `defenses` to it.

python train.py [experiment=...] ['defenses=[none,fine_tuning,pruning,fine_pruning]'] [key=value ...]
(the same as the `backdoor-lab-train` console script)
"""

from backdoor_lab.cli import train_main

if __name__ == "__main__":
    train_main()
