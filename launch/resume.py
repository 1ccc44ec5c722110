"""`--resume`: the run's own config, and the changes a resume refuses without `--force`.

A resumed run continues from the run directory's resolved config (`config.yaml`, written when the run
started) plus the command line's `--set`s, and equals the run that was never interrupted (README
"Training": resuming); a change to anything the numbers depend on would break that, so it is refused,
naming the keys, unless `--force` says it is meant.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError, load_config, to_dict

# Keys whose change makes the resumed run differ from the uninterrupted one: the seed, the model, the
# data and the task (rewards, tools), everything that shapes a step's batch, loss and update (the whole
# train section but the bookkeeping below; ZeRO: train.deepspeed_config), and the server's settings that
# change what it samples (its batching and kernels). Sections and keys, in dotted form.
EXACT = (
    "run.seed",
    "model",
    "data",
    "rollout",
    "rewards",
    "reward_functions",
    "train",
    "server.seed",
    "server.max_model_len",
    "server.tensor_parallel_size",
    "server.data_parallel_size",
    "server.enforce_eager",
)
# ... but for these, which only say when to checkpoint and what to log
BOOKKEEPING = {
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.report_to",
    "train.log_completions_every",
    "train.log_completions",
}
# ... and for the run's length, which changes nothing but under a schedule that spans it
LENGTH = {"train.max_steps", "train.epochs"}


def saved_config_path(run_dir: Path) -> Path:
    return run_dir / "config.yaml"


def resume_config(config_file: Path | None, overrides: list[str], default: Path) -> Config:
    """The config a resumed run continues with: the run's own `config.yaml` (found under the run.root
    and run.name that `config_file`, or `default`, plus `overrides` give), then `overrides` (--set,
    --name). The server token, never written there, comes from the environment (or a --set) again."""
    where = load_config(config_file or default, overrides)
    if not where.run.name:
        raise ConfigError("--resume needs --name (the run to continue)")
    run_dir = Path(where.run.root).expanduser().absolute() / where.run.name
    saved = saved_config_path(run_dir)
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found (no run {where.run.name!r} in {run_dir.parent})")
    if config_file is not None:
        print(
            f"--resume: continuing with the run's own config ({saved}) and --set; "
            f"--config {config_file} only located run.root",
            flush=True,
        )
    # the token is never saved (to_dict writes ""); run.root is where the run was found (moved or not)
    return load_config(saved, ["server.token=", f"run.root={run_dir.parent}", *overrides])


def changes(saved: dict, config: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) of each key of `EXACT` (less the bookkeeping) that differs; the run's
    length only where the learning-rate schedule depends on it (anything but a constant one)."""
    now = _flat(to_dict(config))
    before = _flat(saved)
    t = config.train
    # transformers' "constant" has no warm-up; "constant_with_warmup"'s spans warmup_ratio x the run
    length_free = t.lr_scheduler == "constant" or (
        t.lr_scheduler == "constant_with_warmup" and not t.warmup_ratio
    )
    out = []
    for key, value in now.items():
        if key not in before or before[key] == value or key in BOOKKEEPING:
            continue
        if key in LENGTH and length_free:
            continue
        if any(key == k or key.startswith(k + ".") for k in EXACT):
            out.append((key, before[key], value))
    return out


def saved_ranks(run_dir: Path) -> int | None:
    """How many trainer ranks wrote the latest checkpoint (each keeps its random generators in a file of
    its own); None for a checkpoint without them."""
    checkpoints = run_dir / "checkpoints"
    try:
        tag = (checkpoints / "latest").read_text().strip()
    except OSError:
        return None
    return len(list((checkpoints / tag).glob("rng_state_rank*.pkl"))) or None


def check_changes(config: Config, run_dir: Path, ranks: int, force: bool, say=print) -> None:
    """Refuse (ConfigError, one line naming every key) a resume of `run_dir` whose `config` changes what
    the numbers depend on, or whose plan has another number of trainer `ranks` than the checkpoint's
    (each rank holds a share of the batch), unless `force`, which says what it lets through."""
    saved = yaml.safe_load(saved_config_path(run_dir).read_text()) or {}
    changed = changes(saved, config)
    before = saved_ranks(run_dir)
    if before is not None and before != ranks:
        changed.append(("trainer ranks", before, ranks))
    if not changed:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed)
    if not force:
        raise ConfigError(
            f"--resume: {listed}: the resumed run would no longer equal the uninterrupted one "
            f"(keep {'it' if len(changed) == 1 else 'them'} as in {saved_config_path(run_dir)}, "
            f"or add --force)"
        )
    say(f"--resume --force: {listed}: the resumed run differs from an uninterrupted one", flush=True)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 1}} -> {"train.seed": 1}; a dict-valued key (rewards, reward_functions) stays whole."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in ("rewards", "reward_functions"):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out
