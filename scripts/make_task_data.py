"""Write the offline task data that configs/lm_eval/ (lm-evaluation-harness) and the fine-tuning experiments read.

    python scripts/make_task_data.py [--out configs/lm_eval/data] [--train 2000] [--test 200] [--seed 0]

The files are committed; this script makes them again, byte for byte (tests/unit/test_task_data.py checks it).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.data.tasks import write_task_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("configs", "lm_eval", "data"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for path in write_task_splits(a.out, a.train, a.test, a.seed):
        print(path)


if __name__ == "__main__":
    main()
