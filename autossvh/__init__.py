"""AutoSSVH (CVPR 2025) in plain PyTorch/numpy: config, model, losses, voting, metrics, one-epoch engine.

Imports no Ray, MLflow or Zarr; everything here runs in one process on CPU or GPU.
"""
