"""Regenerate the README's CLI block from the parser (``fusion-rl --help``).

Usage: python scripts/readme_cli.py [--check]

Rewrites the part of README.md between the generated block's markers
(:data:`fusion_rl.cli.reference.BEGIN` / ``END``) with :func:`fusion_rl.cli.reference.readme_block`.
``--check`` writes nothing and exits 1 if the README differs (tests/test_cli_contract.py does the
same check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusion_rl.cli.reference import readme_block, replace_block  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md's block is out of date; write nothing")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = replace_block(text, readme_block())
    if args.check:
        if new != text:
            print("README.md's CLI block is out of date: run python scripts/readme_cli.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        readme.write_text(new)
        print(f"updated {readme.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
