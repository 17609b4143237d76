"""The OmegaConf resolvers our configs use, registered on import by the modules that resolve a config
(``backdoor_lab.build``, ``backdoor_lab.runs``).

* ``${fast_precision:${trainer.accelerator}}`` (``conf/speed/fast.yaml``): bf16 autocast where the hardware runs
  it (a GPU, a CPU with AMX or AVX-512 BF16), fp32 elsewhere, where emulated bf16 trains 7-13x slower.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _fast_precision(accelerator: str) -> str:
    from backdoor_lab.machine import fast_precision  # imports torch: only when a config asks

    return fast_precision(accelerator)


if not OmegaConf.has_resolver("fast_precision"):
    OmegaConf.register_new_resolver("fast_precision", _fast_precision)
