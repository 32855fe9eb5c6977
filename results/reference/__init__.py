"""Published reference numbers (CSV), installed as ``kt_bench.reference`` package data."""
