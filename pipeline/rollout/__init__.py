"""Generation as training, evaluation and the benchmark use it: one completion type, single- and multi-turn
generation through the servers, and evaluation (pass@1, maj@k, pass@k) as a service."""
