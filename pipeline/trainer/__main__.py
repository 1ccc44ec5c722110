"""`python -m pipeline.trainer`: one trainer rank (the launcher starts them under `deepspeed --module`)."""

import sys

from pipeline.trainer.loop import command

sys.exit(command())
