"""``python -m kt_bench`` runs the command line."""

import sys

from kt_bench.cli import main

sys.exit(main())
