"""Defend a checkpoint: python defend.py [ckpt_path=...] ['defenses=[...]'] [-m prune.prune_ratio=0.2,0.5].

(the same as the `backdoor-lab-defend` console script)
"""

from backdoor_lab.cli import defend_main

if __name__ == "__main__":
    defend_main()
