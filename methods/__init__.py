"""Built-in method plugins (installed as ``kt_bench.methods``): one file per method family."""
