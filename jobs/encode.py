"""Encode a split of a feature store into a code store (packed codes, video ids, labels) with Ray workers.

    python jobs/encode.py --model models:/autossvh-fcvid-synthetic@candidate --data runs/data/fcvid-synthetic \\
        --split database --out runs/codes/fcvid
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.encode import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
