"""Distributed runtime on Ray: Train worker loop, clustering actor, MLflow tracking, Tune, local boot."""
