"""`python -m rewardsvc.cli ...` = `rewardsvc ...`."""

import sys

from .main import main

sys.exit(main())
