"""`python -m pipeline.trainer`: one trainer rank (the launcher starts them under `deepspeed --module`)."""

import logging
import os
import sys

from pipeline.trainer.loop import command

code = command()
# The rank has closed everything it owns (trackers, pushes, both process groups). The interpreter's
# teardown can still meet a C++ thread of gloo or a TCPStore that was never joined and abort the rank
# (SIGABRT, exit 250 at the launcher) after a run that succeeded: seen at random in CI even after
# destroy_process_group. So leave without that teardown, having flushed what Python would have.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
