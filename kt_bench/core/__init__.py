"""The base layer: errors, the registry, option resolution, atomic files, locks, interrupts, seeds,
the start-up clock and precision names; imports no torch."""
