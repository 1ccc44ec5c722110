"""Evaluation (pass@1, maj@k), the run report and model card, publishing to the hub."""
