"""Local one-node SLURM cluster for development and CI.

The implementation lives in :mod:`deconflow.slurm.cluster`; it is deliberately not imported here
so that ``python -m deconflow.slurm.cluster`` runs without a double-import warning.
"""
