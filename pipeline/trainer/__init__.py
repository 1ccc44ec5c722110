"""The GRPO trainer under DeepSpeed: set-up, rollouts, loss, metrics, checkpoints, the link to the server."""
