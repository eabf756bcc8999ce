"""``python -m registry_agent`` runs the command line."""

import sys

from registry_agent._cli import main

sys.exit(main())
