"""Config loading: YAML + --set overrides, one-line errors naming the key."""

import pytest

from pipeline.config import ConfigError, check_batch, load_config, to_dict


def test_overrides_and_types(tmp_path):
    c = load_config(
        "configs/tiny-cpu.yaml",
        ["train.max_steps=5", "train.learning_rate=1e-4", "rewards.correctness=2", "server.token=abc"],
    )
    assert c.train.max_steps == 5 and c.train.learning_rate == 1e-4 and c.rewards == {"correctness": 2.0}
    assert to_dict(c)["server"]["token"] == ""  # a saved config gives a reused server no known token


def test_the_old_redacted_placeholder_is_no_token(tmp_path):
    """Saved configs once held `token: <redacted>`: reused, it was a token everybody knows. Refused."""
    saved = tmp_path / "config.yaml"
    saved.write_text("server:\n  token: <redacted>\n")
    with pytest.raises(ConfigError, match=r"^server\.token: '<redacted>' is the placeholder"):
        load_config(str(saved))
    assert load_config(None, ["server.token=abc"]).server.token == "abc"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=5", "train.max_stepz: unknown key"),
        ("trian.max_steps=5", "trian: unknown key"),
        ("train.max_steps=abc", "train.max_steps: expected int"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("train=3", "train: expected a section"),
        ("rewards.corectness=1", "rewards.corectness: unknown reward"),
        (
            "train.loss_aggregation=token",
            "train.loss_aggregation: replaced by train.loss_type (sequence -> grpo, token -> dapo)",
        ),
        ("train.loss_type=token", "train.loss_type: expected one of grpo, bnpo, dapo, dr_grpo"),
        ("train.epsilon_high=0.1", "train.epsilon_high: must be 0 (= epsilon) or >= train.epsilon=0.2"),
        ("train.max_completion_tokens=400", "exceeds server.max_model_len"),
        ("train.num_generations=1", "train.num_generations"),
        ("sync.transport=tcp", "sync.transport"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio: expected a value in [0, 1)"),
        (
            "train.lr_scheduler=linear",
            "train.min_lr_ratio: expected a value in [0, 1) with lr_scheduler cosine",
        ),
        ("noequals", "expected section.key=value"),
        (
            "train.completions_per_step=20",
            "train.completions_per_step=20: must be 0 or a multiple of train.num_generations=16",
        ),
        (
            "server.gpu_memory_utilization=1.5",
            "server.gpu_memory_utilization: expected 0 (auto) or a share in (0, 1]",
        ),
        ("server.data_parallel_size=0", "server.data_parallel_size: must be positive, got 0"),
        ("train.temperature=0", "train.temperature: must be > 0, got 0.0"),
        (
            "train.top_p=0.9",
            "train.top_p=0.9: must be 1.0; vLLM's logprobs under nucleus sampling are renormalised "
            "over the nucleus, the trainer's are over the whole vocabulary, so the ratio pi_theta / mu "
            "would be biased",
        ),
        ("train.top_p=1.5", "train.top_p=1.5: must be 1.0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny-cpu.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_into_groups():
    c = load_config("configs/tiny-cpu.yaml", ["train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="not a multiple of train.num_generations=16"):
        check_batch(c, 2)
    assert check_batch(load_config("configs/tiny-cpu.yaml"), 2) == 8
    # the recipe's step as the launcher derived it for 1 rank; a trainer started with other numbers is told
    recipe = load_config("configs/prem-1b-gsm8k.yaml", ["train.gradient_accumulation_steps=8"])
    assert recipe.train.completions_per_step == 16 and check_batch(recipe, 1) == 1
    with pytest.raises(
        ConfigError, match=r"train.completions_per_step=16, but .* = 2 x 8 x 2 = 32; launch/train.py"
    ):
        check_batch(recipe, 2)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=f"{bad}: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
