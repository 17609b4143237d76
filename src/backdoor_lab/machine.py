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


def cpu_name() -> str:
    """The CPU as a person reads it (``model name``, else what ``platform`` knows), for the figures benches print."""
    return cpu_fields().get("model name") or platform.processor() or platform.machine()


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


BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")  # x86 flags under which oneDNN runs bf16 convs in hardware


def cpu_bf16_instructions() -> str | None:
    """The CPU's bf16 matrix instructions (``"amx_bf16"``, ``"avx512_bf16"``), or None where it has none.

    Without them oneDNN emulates bf16 in fp32 registers, and bf16 autocast trains 7-13x slower than fp32 (an AVX2
    AMD EPYC, docs/benchmarks.md); with them it trains 1.8-2.6x faster. Other architectures are not measured, so
    they count as having none.
    """
    flags = cpu_flags()
    return next((name for name in BF16_INSTRUCTIONS if name in flags), None)


def fast_precision(accelerator: str) -> str:
    """The fastest precision whose numbers hold (``speed=fast``'s ``trainer.precision``): bf16 autocast on a GPU
    or on a CPU with bf16 instructions, fp32 on any other CPU (where bf16 is emulated, and slower)."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return "32-true" if on_cpu and not cpu_bf16_instructions() else "bf16-mixed"


def describe_device(device: torch.device | str = "cpu") -> str:
    """One line naming what a figure was measured on, so that a bench's output can be re-taken elsewhere and
    compared: the GPU's name, or the CPU's model, torch's threads and the CPU's bf16 instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        bf16 = cpu_bf16_instructions() or "none (speed=fast keeps fp32)"
        name = f"{cpu_name()}, {torch.get_num_threads()} threads; bf16 instructions: {bf16}"
    return f"device: {device.type} ({name}); torch {torch.__version__}"
