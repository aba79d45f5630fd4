"""Sweep AutoSSVH hyperparameters with Ray Tune (ASHA + Optuna) on a validation split carved from the training
set; registers the best trial's model with alias candidate. Search space and details: cluster/tune.py.

    python jobs/tune.py --dataset ucf101 --trials 4 --max-concurrent 1 --epochs 6     # generated data, CPU
    ray job submit --working-dir . -- python jobs/tune.py --dataset ucf101 --data s3://bucket/features/ucf101 \\
        --storage s3://bucket/ray --trials 32 --workers 1 --gpus-per-worker 1 --mlflow-uri http://HOST:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.tune import add_arguments, run_sweep  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    raise SystemExit(run_sweep(args.dataset, args))
