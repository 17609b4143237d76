"""Which float arithmetic this CPU runs, for the tests that pin numbers bit for bit.

oneDNN, MKL and numpy pick their kernels by the CPU's vendor and widest vector unit, and the kernels sum in other
orders: the same seed gives the same numbers on one kind of CPU, not across kinds (an AVX2 AMD machine renders
another last bit of some sign images than an AMX Intel one). Pins are therefore recorded per kind.
"""

from __future__ import annotations

import platform

from backdoor_lab.machine import cpu_fields, cpu_flags

# Widest first: the first a CPU has names its kind.
VECTOR_UNITS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "asimd")
# The kind the pins written into the tests themselves were recorded on.
REFERENCE_KIND = "x86_64-GenuineIntel-amx_bf16"


def cpu_kind() -> str:
    """``<machine>-<vendor>-<widest vector unit>``, e.g. ``x86_64-AuthenticAMD-avx2``."""
    flags = cpu_flags()
    unit = next((u for u in VECTOR_UNITS if u in flags), "plain")
    return f"{platform.machine()}-{cpu_fields().get('vendor_id', 'unknown')}-{unit}"
