"""`python -m pipeline.report RUN_DIR` (make report): the run's curves and model card."""

import sys

from pipeline.report.card import main

sys.exit(main())
