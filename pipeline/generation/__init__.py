"""The generation server (vLLM engine behind authenticated HTTP), its worker extension and its client."""
