"""Hydra configs of backdoor_lab (a package so that Hydra finds them in an installed wheel)."""
