"""vLLM-accelerated GRPO post-training, in parts (each a subpackage; a part imports only those before it):

    options.py   the ground floor, in order: the names of every option's choices (standard library only),
    config.py    one config for every process (loading it imports no torch),
    device.py    where CPU and GPU runs differ
    task/        the problem: the XML answer format, answers, data sources, synthetic problems, rewards,
                 the reasoning checker, tools (pure Python, no torch)
    embedded/    the default model built offline: a tiny Qwen2, its tokenizer, an SFT warm start
    generation/  the vLLM generation server, its HTTP client, its process
    sync/        weights into the running server: vLLM's weight-transfer API, our gloo engine, the
                 workers' side (their extension, digests), LoRA export
    rollout/     generation as training, evaluation and the benchmark use it: the one completion type,
                 single- and multi-turn (tool-calling) generation through the servers, evaluation
    report/      the end of a run: the evaluate command, the run report and model card, publishing
    trainer/     the GRPO loop under DeepSpeed: set-up, rollouts, the loss, metrics, checkpoints

`pipeline.rewards` is the public place to import the recipe's reward functions from (TRL-compatible).
tests/test_layout.py checks that no part imports a later one, and that no imports form a circle.
"""
