"""From run folders to the DuckDB file users query (SPEC section 5), one job per module:

- :mod:`~deconflow.warehouse.publish`: a finished attempt replaces its published run folder;
- :mod:`~deconflow.warehouse.tables`: the runs, run_fits and completeness tables;
- :mod:`~deconflow.warehouse.database`: the DuckDB file, built by one writer;
- :mod:`~deconflow.warehouse.gates`: quality gates (GO / NO-GO) on that file;
- :mod:`~deconflow.warehouse.export`: the CSV + metadata + time-series export.

Import the submodule you need: this package imports none of them, so code that only
publishes a run folder (the training asset, in every run worker) loads no pandas or DuckDB.
"""
