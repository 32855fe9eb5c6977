"""What a user asks of kt-bench, from the command line or from Python: the run of a grid
(:mod:`kt_bench.workflow.run`, shared by ``kt-bench run`` and ``kt_bench.run``) and the
Python API of notebooks and scripts (:mod:`kt_bench.workflow.notebook`).

It sits at the layer of :mod:`kt_bench.commands`, whose thin command modules call it."""
