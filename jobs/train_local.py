"""Train AutoSSVH on FCVID-shaped data in one process without Ray and print the mAP@K table.

The single-process path (jobs/train_fcvid.py is the Ray Train job): without ``--data`` it trains a reduced
FCVID preset on a generated FCVID-like dataset (about a minute on 2 CPU cores); with ``--data URL`` it trains
on a feature store (jobs/ingest.py, jobs/make_synthetic.py) loaded into memory.

    python jobs/train_local.py                              # reduced preset on generated data
    python jobs/train_local.py --epochs 20 --bits 32 --set train.lr=2e-4 --recipe released
    python jobs/train_local.py --data runs/stores/fcvid-like
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.single_process import add_arguments, run  # noqa: E402


def main() -> int:
    parser = job_parser(__doc__)
    add_arguments(parser)
    return run("fcvid", parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
