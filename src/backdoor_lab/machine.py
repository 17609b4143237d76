"""The CPU a process runs on, as ``/proc/cpuinfo`` names it: float kernels (oneDNN, MKL, numpy) are chosen by it, so
the last bits of a score follow it (``build.evaluation_key``; the tests' per-kind pins in ``tests/machine.py``)."""

from __future__ import annotations

import hashlib
import platform
from functools import cache
from pathlib import Path

import torch


@cache
def cpu_fields() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``vendor_id``, ``model name``, ``flags``...); {} where
    there is none (macOS, Windows)."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in (cpuinfo.read_text() if cpuinfo.is_file() else "").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The instruction sets the CPU reports (``flags`` on x86, ``Features`` on ARM)."""
    fields = cpu_fields()
    return set(fields.get("flags", fields.get("Features", "")).split())


@cache
def cpu_identity() -> str:
    """The CPU's model and instruction sets, with the platform and torch's dispatch level."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    model = cpu_fields().get("model name", platform.processor())
    return f"{platform.platform()} {model} {torch.backends.cpu.get_cpu_capability()} {flags}"
