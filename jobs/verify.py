"""Read every chunk of a feature store and list damaged, missing and non-finite videos, bad labels and repeated
ids by id.

    python jobs/verify.py /data/stores/fcvid
    python jobs/verify.py s3://bucket/ucf101 --storage-option anon=false --json runs/verify-ucf101.json

Exit status 0 when every chunk reads back intact and finite, 1 when problems were found (each listed with its
file, rows and video ids), 2 when there is no readable store at the URL (its metadata or an array missing or
damaged, named).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from storage.verify import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
