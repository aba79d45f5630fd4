"""Move a registered model's alias (candidate -> champion) if the candidate is not worse on the same data.

    python jobs/promote.py autossvh-fcvid-synthetic --from candidate --to champion --data runs/data/fcvid-synthetic
    python jobs/promote.py autossvh-fcvid-synthetic --data runs/data/fcvid-synthetic --force
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.registry import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
