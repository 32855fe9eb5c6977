"""Sweeping grids: TOML grids, cells, teachers, the dry-run probe, cost estimates, the runner,
launchers, result rows and the manifest."""
