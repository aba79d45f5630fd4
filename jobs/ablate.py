"""The paper's Table 3 as one command: rows x seeds as a Ray Tune grid of Ray Train runs, evaluated on the test
protocol; prints and logs to MLflow the mean ± std table (with ITQ as a training-free row), GMAP by epoch and the
epochs each row needs to reach 90 % of the full row. Re-running the same command runs only the trials that did
not finish. Rows and details: cluster/ablate.py.

    python jobs/ablate.py --dataset ucf101 --seeds 3 --epochs 30                      # generated data, CPU
    python jobs/ablate.py --dataset ucf101 --data runs/stores/ucf101 --rows IX II I --seeds 3 --epochs 40
    ray job submit --working-dir . -- python jobs/ablate.py --dataset ucf101 --data s3://bucket/features/ucf101 \\
        --storage s3://bucket/ray --seeds 3 --workers 1 --gpus-per-worker 1 --mlflow-uri http://HOST:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.ablate import add_arguments, run_ablation  # noqa: E402
from cluster.cli import job_parser  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    raise SystemExit(run_ablation(args.dataset, args))
