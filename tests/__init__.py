"""kt-bench test suite."""
