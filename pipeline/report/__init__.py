"""The end of a run: the evaluate command (`python -m pipeline.report.evaluate`; the evaluation itself is
pipeline/rollout/evaluate.py), the run report and model card, publishing to the hub."""
