"""Move a registered model's alias (candidate -> champion) if the candidate is not worse on the same data.

    python jobs/promote.py autossvh-fcvid-synthetic --from candidate --to champion --data runs/data/fcvid-synthetic
    python jobs/promote.py autossvh-fcvid-synthetic --data runs/data/fcvid-synthetic --force
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.registry import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
