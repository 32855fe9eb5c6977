"""Seeds for each purpose of a run, derived from the cell's seed."""

from __future__ import annotations


def derived_seed(seed: int, *salt: int) -> int:
    """A seed for one purpose (e.g. one epoch's data order, a method's parameters) derived
    from the cell's seed and ``salt``; the same arguments always give the same seed."""
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s + 0x9E3779B9) % (2**63 - 1)
    return value
