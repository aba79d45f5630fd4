"""Data at rest: feature store, ingest, synthetic datasets, per-rank reader."""
