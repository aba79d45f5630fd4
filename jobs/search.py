"""Search a code store by Hamming distance: the nearest stored videos of a stored video or of new features.

    python jobs/search.py --codes runs/codes/fcvid-test --query database_000042 --top-k 10
    python jobs/search.py --codes s3://bucket/codes/fcvid --features clip.npy \\
        --model models:/autossvh-fcvid@candidate --mlflow-uri sqlite:///runs/mlflow.db --top-k 20 --json

Prints rank, video id, Hamming distance and labels per query; an unknown video id, a bad input or a store
error exits with status 2. --index flat is exact (ties by ascending store row), multihash is approximate.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.search import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
