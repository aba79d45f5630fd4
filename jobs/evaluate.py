"""Evaluate a trained model on a feature store: the mAP@K table, GMAP and the PR curve.

    python jobs/evaluate.py --model models:/autossvh-fcvid-synthetic@candidate --data runs/data/fcvid-synthetic
    python jobs/evaluate.py --model runs/ray/fcvid-64bits-paper --data s3://bucket/features/fcvid --workers 8 \\
        --gpus-per-worker 1 --summary-json eval.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.evaluate import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
