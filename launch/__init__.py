"""The launcher: starts a run's generation engines and trainer ranks where the launch plan puts them.

    train.py        the command (`python launch/train.py`, `python -m launch.train`, `grpo-train`) and
                    `train(config, Options(...))`, the same run started from Python; three phases:
                    resolve (the finished config and plan), preflight (every check before anything
                    starts), supervise (engines, trainer, evaluations, report)
    plan.py         the launch plan, typed: which processes, on which hosts and GPUs, with which
                    commands and environment (pure Python; `--dry-run` prints it, `--plan-json` writes it)
    memory.py       the plan's GPU memory split: a trainer rank's modelled peak, what vLLM needs
    srun_rank.py    one trainer rank under SLURM (`--launcher slurm`)
    sft_control.py  the SFT-for-the-same-time control of a finished run (`make sft-control`)

An installed package (pyproject.toml): the pipeline below it never imports it.
"""
