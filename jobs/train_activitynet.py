"""Train AutoSSVH on ActivityNet with Ray Train (DDP workers, clustering actor, MLflow) and print the mAP@K table.

Runs as ``python jobs/train_activitynet.py`` (starts a local Ray) and as
``ray job submit --working-dir . -- python jobs/train_activitynet.py ...`` (uses the cluster at RAY_ADDRESS).
Without ``--data`` it trains a reduced preset on a small generated ActivityNet-like store (cached under runs/data).

    python jobs/train_activitynet.py                                   # reduced preset, 2 CPU workers
    python jobs/train_activitynet.py --data runs/stores/activitynet --bits 64 --workers 4 --gpus-per-worker 1 \\
        --register activitynet-64
    python jobs/train_activitynet.py --name my-run                     # re-run the same name to resume it
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.train import add_arguments, run  # noqa: E402


def main() -> int:
    parser = job_parser(__doc__)
    add_arguments(parser)
    return run("activitynet", parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
