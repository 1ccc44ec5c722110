"""Weights into the running server: vLLM's weight-transfer API (nccl, ipc) and our gloo engine, verified."""
