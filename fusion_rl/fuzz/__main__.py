"""Child entry points of the fuzzer: ``python -m fusion_rl.fuzz reproduce DIR`` and ``... force``."""

from __future__ import annotations

import sys
from typing import Sequence

from fusion_rl.fuzz.force import force_child
from fusion_rl.fuzz.reproduce import reproduce


def main(argv: Sequence[str]) -> int:
    """Internal entry points: ``reproduce DIR [--write-actual] [--force]`` and ``force ...``."""
    if argv and argv[0] == "force" and len(argv) == 4:
        force_child(*argv[1:])
        return 0
    if argv and argv[0] == "reproduce" and len(argv) >= 2:
        reproduced, verdict = reproduce(argv[1], "--write-actual" in argv, "--force" in argv)
        print(verdict)
        return 1 if reproduced else 0
    print("usage: python -m fusion_rl.fuzz reproduce DIR [--write-actual] [--force]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
