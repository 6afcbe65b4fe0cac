"""`python -m kanal ...` is the `kanal` command."""

import sys

from kanal.commands.cli import main

sys.exit(main())
