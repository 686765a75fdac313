"""``python -m cpd_fast.cli ...`` (what ``torchrun -m cpd_fast.cli distill ... --ddp`` runs): ``cpd``."""

import sys

from cpd_fast.cli import main

sys.exit(main())
