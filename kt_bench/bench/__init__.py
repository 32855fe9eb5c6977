"""The speed benchmark behind kt-bench bench, apart from the core."""
