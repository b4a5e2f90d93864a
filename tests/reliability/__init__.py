"""Helpers for the reliability suite (soak, faults, output integrity)."""
