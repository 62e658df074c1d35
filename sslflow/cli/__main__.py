"""`python -m sslflow.cli ...` (what DVC stages and torchrun run): the `sslflow` command."""

import sys

from sslflow.cli import main

sys.exit(main())
