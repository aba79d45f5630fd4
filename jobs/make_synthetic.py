"""Write a synthetic dataset shaped like a real one into a Zarr feature store.

    python jobs/make_synthetic.py --like fcvid --videos 4000 --feature-dim 512 --out /data/stores/fcvid-like
    python jobs/make_synthetic.py --like activitynet --videos 2000 --out memory://demo

Same schema, writer, resume and progress as jobs/ingest.py; the store's sources record the generator parameters.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from storage.synthetic_store import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
