"""Ingest the released feature files (or custom h5/npy + .mat/.npy files) into a Zarr feature store.

    python jobs/ingest.py --dataset fcvid --source /data/fcvid --out /data/stores/fcvid
    python jobs/ingest.py --dataset ucf101 --source /data/ucf --out s3://bucket/ucf101 --storage-option anon=false
    python jobs/ingest.py --dataset custom --protocol separate --train tr.h5 --query q.h5:feats \\
        --query-labels q.mat:labels --database db.h5 --database-labels db.npy --out /data/stores/mine

Streams in blocks of whole shards, resumes when re-run with the same arguments, refuses bad input with exit
status 2 before writing anything (NaN/Inf is found while streaming and leaves the store incomplete).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from storage.ingest import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
