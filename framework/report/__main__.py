"""``python -m framework.report <run_dir | json> [...]``: prints the path of every PNG it wrote."""

from __future__ import annotations

import argparse
import sys

from framework.cli import UserError, fail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framework.report", description=(__doc__ or "").split(":", 1)[-1].strip())
    ap.add_argument("paths", nargs="+", metavar="run_dir_or_json",
                    help="a framework.train run directory, a benchmark's JSON, or an lm-eval results JSON")
    args = ap.parse_args(argv)
    try:
        from framework.report import report

        for path in args.paths:
            plots = report(path)
            for line in plots.skipped:
                print(line, file=sys.stderr)
            for p in plots.written:
                print(p)
    except UserError as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
