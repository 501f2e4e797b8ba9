#!/usr/bin/env python
"""Train a fusion policy: ``python scripts/train.py --config experiments/train_tiny.yaml --seed 1``.

Resume a killed run from its latest checkpoint: ``python scripts/train.py --resume runs/<run>``.
The procedure itself (config -> env -> model -> learn -> checkpoints) is
:func:`fusion_rl.policy.training.train`; this script is the same as ``fusion-rl train``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    # TVM uses one thread here unless told; measurement workers set their own from the target.
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    from fusion_rl.cli.train import add_train_args, run_from_args
    from fusion_rl.errors import FusionRLError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except FusionRLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
