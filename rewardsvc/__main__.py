"""`python -m rewardsvc ...` = `rewardsvc ...` (and so `torchrun --nproc-per-node N -m rewardsvc score ...`)."""

import sys

from rewardsvc.cli.main import main

sys.exit(main())
