import sys

from fusion_rl.cli import main

sys.exit(main())
