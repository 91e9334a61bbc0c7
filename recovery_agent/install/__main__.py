"""``python3 -m recovery_agent.install``: the install's commands with the standard library only."""

import sys

from .cli import main

sys.exit(main())
