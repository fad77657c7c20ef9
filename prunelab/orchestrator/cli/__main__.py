"""``python -m prunelab.orchestrator.cli``: the ``prunelab`` command."""

import sys

from prunelab.orchestrator.cli import main

sys.exit(main())
