"""deconflow: a Dagster asset-graph platform for the loss-slope sweep."""

__version__ = "0.1.0"
