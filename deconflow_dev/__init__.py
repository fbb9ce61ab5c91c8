"""Development and CI tools that are not part of the runtime package ``deconflow``.

:mod:`deconflow_dev.slurm_cluster` is the local one-node SLURM cluster (``deconflow slurm
up|down|status|env``) that the SLURM tests and benchmarks run against.
"""
