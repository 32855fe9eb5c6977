"""``python -m kt_bench`` runs the command line."""

import sys

from kt_bench.commands.main import main

sys.exit(main())
