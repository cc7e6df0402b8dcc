"""Batch jobs: `python -m etl <job> --help`."""
