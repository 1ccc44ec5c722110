"""Names every part of the suite agrees on."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_TAG = "GRPO_TEST_RUN"  # every process a test's run starts inherits this: orphans are found by it
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
# End-to-end tests run configs/tiny-cpu.yaml at a smaller scale than `make train`: 2 prompts x 16
# completions per step, eval maj@8 on 32 problems (the launcher evaluates before and after every run:
# on all 200, about 14 s of a 3-step run's 32). A test's own --set options come after these and win.
TEST_SCALE = [
    "--set",
    "train.micro_batch_size=8",
    "--set",
    "train.gradient_accumulation_steps=2",
    "--set",
    "train.max_completion_tokens=96",
    "--set",
    "eval.maj_k=8",
    "--set",
    "eval.limit=32",
]
SERVER_TOKEN = "test-token-not-secret"  # the shared test server's (tests/conftest.py `server`)
