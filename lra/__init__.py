"""lra: a Long Range Arena benchmark harness (tasks, data, training, results)."""

__version__ = "0.1.0"
