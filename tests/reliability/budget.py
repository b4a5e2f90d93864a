"""Run budgets: CI defaults, raised through the environment (``make soak``)."""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    value = int(text, 10)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


def soak_cycles() -> int:
    """Create/start/wait/remove cycles of the soak test."""
    return env_int("KATA_SOAK_CYCLES", 100)


def output_runs() -> int:
    """Runs of the 1 MiB output-integrity test."""
    return env_int("KATA_OUTPUT_RUNS", 50)


def flood_seconds() -> int:
    """How long a process floods stdout with nobody reading."""
    return env_int("KATA_FLOOD_SECONDS", 30)
