"""Extract frame features from video files into a feature store, on Ray Data (decoding tasks + backbone actors).

    python jobs/extract.py --videos /data/ucf101/train/ --labels ucf101.csv --split train --out runs/stores/ucf
    python jobs/extract.py --videos /data/ucf101/test/ --labels ucf101.csv --split query --out runs/stores/ucf
    python jobs/extract.py --videos 's3://bucket/videos/*.mp4' --split train --protocol query_is_database \\
        --out s3://bucket/features/mine --workers 8 --gpus-per-worker 1 --batch-size 16

One run extracts one split; the store is complete once every split of --protocol is extracted
(database_is_train, the default: train and query, the database being train, as UCF101/HMDB51; query_is_database:
train and database; separate: train, query and database). Evaluated splits need --labels: a CSV with the columns
path,classes (class names separated by ';'; paths relative to --videos or as listed), one file for all splits.

Each video gives T frames (--frames, default 25): frame i is source frame floor((i + 0.5) * n / T) of its n
frames, decoded by seeking; shorter videos repeat frames by that rule and the store keeps every n. Video ids are
the source paths. The default backbone is vgg16-fc7 (4,096-d, the paper's features) with torchvision's ImageNet
weights (downloaded into torch hub's cache when reachable; else --weights FILE). --random-weights is for tests
and benchmarks only.

Re-running the same command resumes (written and failed videos are skipped). A video that cannot be decoded is
skipped, reported and listed in the store's sources.failed; it gets no row. Bad input exits with status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import job_parser  # noqa: E402
from cluster.extract import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
