"""Your own data, prompt and rewards: file kinds, column names, answer formats, system prompt, chat
template, reward plugins and their errors. Pure Python except where a tokenizer is needed."""

import json
import sys
import textwrap

import pytest
from support.launcher import launch
from support.processes import one_line_error
from support.runs import read_metrics

from pipeline.config import ConfigError, load_config
from pipeline.task.answers import answers_equivalent, extract_boxed, extract_reference
from pipeline.task.data import (
    SYSTEM_PROMPT,
    DataError,
    Example,
    Fields,
    PromptStyle,
    examples_for,
    read_file,
    resolve_system_prompt,
)
from pipeline.task.reward_functions import BUILTIN_REWARDS, RewardError, load_rewards, score_completions

ROWS = [
    {"problem": "What is 2+3?", "final": "5", "level": 1},
    {"problem": "What is 10/4?", "final": "5/2", "level": 3},
]
FIELDS = Fields("problem", "final", "plain")


def write(tmp_path, kind: str, rows=ROWS):
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        keys = list(rows[0])
        path.write_text(
            ",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows)
        )
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_each_file_kind_with_other_columns_and_plain_answers(tmp_path, kind):
    examples = read_file(write(tmp_path, kind), FIELDS, kind)
    assert [(e.question, e.answer) for e in examples] == [("What is 2+3?", "5"), ("What is 10/4?", "5/2")]
    level = examples[1].columns["level"]
    assert int(level) == 3 and set(examples[0].columns) == {"level"}  # CSV gives text, the others numbers


@pytest.mark.parametrize("kind,where", [("jsonl", ":2"), ("csv", ":3"), ("parquet", ":row 2")])
def test_a_bad_row_names_file_and_line_in_every_kind(tmp_path, kind, where):
    path = write(tmp_path, kind, [ROWS[0], {"problem": "no answer here", "final": "", "level": 2}])
    with pytest.raises(DataError) as err:
        read_file(path, FIELDS, kind)
    assert str(err.value) == f"{path}{where}: 'final' has an empty final answer (data.answer_format=plain)"


def test_a_missing_column_lists_the_columns_there_are(tmp_path):
    path = write(tmp_path, "jsonl")
    with pytest.raises(
        DataError, match=r"data.jsonl:1: missing field 'question' \(columns: problem, final, level\)"
    ):
        read_file(path, Fields(), "jsonl")


def test_csv_with_a_ragged_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("problem,final\nWhat is 1+1?,2\nWhat is 2+2?,4,extra\n")
    with pytest.raises(DataError, match=r"d.csv:3: 2 columns in the header, a different number on this line"):
        read_file(path, Fields("problem", "final", "plain"), "csv")


def test_boxed_answers_and_math_verify():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} then \boxed{x^{2}+1}") == "x^{2}+1"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_reference(r"... the answer is $\boxed{\frac{5}{2}}$.", "boxed") == r"\frac{5}{2}"
    with pytest.raises(ValueError, match="boxed"):
        extract_reference("42", "boxed")
    assert answers_equivalent("5/2", r"\frac{5}{2}") and answers_equivalent("2.5", r"\frac{5}{2}")
    assert answers_equivalent("x(x+2)", "x^2+2x") and not answers_equivalent("x(x+3)", "x^2+2x")
    assert answers_equivalent("18", "18.00") and not answers_equivalent("17", "18")
    for junk in ("{{{", "\\frac{", "", None, "1" * 5000, "\\boxed{" * 50):
        assert answers_equivalent(junk, r"\frac{1}{2}") is False  # never raises


def test_correctness_reward_uses_symbolic_equivalence():
    fn = BUILTIN_REWARDS["correctness"].fn
    done = "<reasoning>\nr\n</reasoning>\n<answer>\n{}\n</answer>"
    assert fn(
        completions=[done.format("1/2"), done.format("0.5"), done.format("2")], answer=[r"\frac{1}{2}"] * 3
    ) == [2.0, 2.0, 0.0]


def test_system_prompt_text_file_and_errors(tmp_path):
    assert resolve_system_prompt("") == SYSTEM_PROMPT
    assert resolve_system_prompt("Be brief.") == "Be brief."
    (tmp_path / "p.txt").write_text("From a file.\n")
    assert resolve_system_prompt(f"@{tmp_path}/p.txt") == "From a file."
    with pytest.raises(DataError, match=f"data.system_prompt: cannot read {tmp_path}/nope.txt"):
        resolve_system_prompt(f"@{tmp_path}/nope.txt")


def test_prompts_with_and_without_a_chat_template(tiny_tokenizer):
    example = Example("What is 2+3?", "5", "5", "t")
    chat = tiny_tokenizer.decode(PromptStyle("Be brief.", None).ids(tiny_tokenizer, example))
    assert "Be brief." in chat and "What is 2+3?" in chat and chat != "Be brief.\n\nWhat is 2+3?\n"
    plain = tiny_tokenizer.decode(PromptStyle("Be brief.", False).ids(tiny_tokenizer, example))
    assert plain.endswith("Be brief.\n\nWhat is 2+3?\n")


def test_base_models_without_a_template_get_plain_prompts(tiny_tokenizer):
    import copy

    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    example = Example("What is 2+3?", "5", "5", "t")
    assert base.decode(PromptStyle("Sys", None).ids(base, example)).endswith("Sys\n\nWhat is 2+3?\n")


def test_config_reads_the_data_options(tmp_path):
    path = write(tmp_path, "csv")
    config = load_config(
        None,
        [
            "data.source=csv",
            f"data.train_file={path}",
            "data.question_key=problem",
            "data.answer_key=final",
            "data.answer_format=plain",
            "data.chat_template=false",
        ],
    )
    assert [e.answer for e in examples_for(config.data, "train", 0)] == ["5", "5/2"]
    assert PromptStyle.from_config(config.data) == PromptStyle(SYSTEM_PROMPT, False)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.answer_format=latex", "data.answer_format: expected one of gsm8k, plain, boxed, got 'latex'"),
        ("data.chat_template=maybe", "data.chat_template: expected one of auto, true, false, got 'maybe'"),
        ("data.source=xml", "data.source: expected one of synthetic, jsonl, csv, parquet, hub, got 'xml'"),
        ("data.source=csv", "data.train_file: required when data.source is csv"),
        ("data.answer_key=question", "data.answer_key: the same column as data.question_key ('question')"),
        ("data.synthetic_levels=0", "data.synthetic_levels: expected 1 to 6 arithmetic steps, got 0"),
        ("model.build_early_answers=1.5", "model.build_early_answers: expected a share in [0, 1], got 1.5"),
        ("model.build_tool_demos=-0.1", "model.build_tool_demos: expected a share in [0, 1], got -0.1"),
        ("data.synthetic_max_operand=9", "data.synthetic_max_operand: expected 10 to 1000000, got 9"),
        (
            "rewards.mine=1",
            "rewards.mine: unknown reward (expected one of: strict_format, soft_format, int_answer, "
            "xml_count, correctness, reasoning_steps; your own go in reward_functions)",
        ),
    ],
)
def test_bad_data_options_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


PLUGIN = textwrap.dedent('''
    def level_bonus(prompts, completions, answer, level, **kwargs):
        """Harder problems (level) earn more."""
        return [0.1 * int(x) for x in level]
    level_bonus.max_points = 0.5

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def not_a_number(prompts, completions, **kwargs):
        return ["high"] * len(completions)

    def not_applicable(prompts, completions, **kwargs):
        return [None] * len(completions)

    def broken(prompts, completions, **kwargs):
        return 1 / 0
''')


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_plugin_reward_is_loaded_weighted_and_reads_a_column(plugin_module):
    rewards = load_rewards(
        {"level_bonus": f"{plugin_module}:level_bonus", "na": f"{plugin_module}:not_applicable"}
    )
    assert (
        rewards["level_bonus"].points == 0.5
        and rewards["level_bonus"].about == "Harder problems (level) earn more."
    )
    totals, per = score_completions(
        ["x", "y"], ["1", "2"], {"level_bonus": 2.0}, rewards, columns={"level": [1, 3]}
    )
    assert per["level_bonus"] == pytest.approx([0.1, 0.3]) and per["na"] == [0.0, 0.0]
    assert totals == pytest.approx([0.2, 0.6])  # nothing else scores on "x"/"y"


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "my_rewards:wrong_length",
            "reward bad (my_rewards:wrong_length) returned 1 values for 2 completions",
        ),
        (
            "my_rewards:not_a_number",
            "reward bad (my_rewards:not_a_number) returned a value that is not a finite number or None",
        ),
        ("my_rewards:broken", "reward bad (my_rewards:broken) raised ZeroDivisionError: division by zero"),
    ],
)
def test_a_misbehaving_plugin_is_named(plugin_module, spec, message):
    rewards = load_rewards({"bad": spec})
    with pytest.raises(RewardError) as err:
        score_completions(["x", "y"], ["1", "2"], {}, rewards)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "spec,message",
    [
        ("my_rewards", "reward_functions.bad: expected 'module:function', got 'my_rewards'"),
        (
            "no_such_module:f",
            "reward_functions.bad: cannot load 'no_such_module:f': ModuleNotFoundError: "
            "No module named 'no_such_module'",
        ),
        (
            "my_rewards:nope",
            "reward_functions.bad: cannot load 'my_rewards:nope': AttributeError: "
            "module 'my_rewards' has no attribute 'nope'",
        ),
    ],
)
def test_a_plugin_that_cannot_load_is_named(plugin_module, spec, message):
    with pytest.raises(RewardError) as err:
        load_rewards({"bad": spec})
    assert str(err.value) == message


def test_a_plugin_cannot_shadow_a_builtin(plugin_module):
    with pytest.raises(RewardError, match="reward_functions.correctness: 'correctness' is a built-in reward"):
        load_rewards({"correctness": "my_rewards:level_bonus"})


# --- end to end: a user's dataset, prompt and reward on the CPU default model ------------------------


def user_dataset(gsm8k_dir, path, rows: int):
    """GSM8K problems as a user's CSV: other column names, plain answers, an extra `level` column."""
    import csv

    from pipeline.task.data import read_jsonl

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["problem", "final", "level"])
        for i, e in enumerate(read_jsonl(gsm8k_dir / "train.jsonl")[:rows]):
            out.writerow([e.question, e.answer, 1 + i % 3])
    return path


@pytest.mark.e2e
def test_a_run_on_your_own_data_prompt_and_reward(server, warm_model_dir, gsm8k_dir, tmp_path):
    data = user_dataset(gsm8k_dir, tmp_path / "mine.csv", 64)
    (tmp_path / "prompt.txt").write_text(SYSTEM_PROMPT + "\nShow your work.\n")
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    proc = launch(
        "--name",
        "mine",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "data.source=csv",
        "--set",
        f"data.train_file={data}",
        "--set",
        f"data.test_file={data}",
        "--set",
        "data.question_key=problem",
        "--set",
        "data.answer_key=final",
        "--set",
        "data.answer_format=plain",
        "--set",
        f"data.system_prompt=@{tmp_path}/prompt.txt",
        "--set",
        "reward_functions.level_bonus=my_rewards:level_bonus",
        "--set",
        "rewards.level_bonus=0.5",
        "--set",
        "train.max_steps=2",
        "--set",
        "eval.limit=4",
        "--set",
        "eval.maj_k=0",
        server=server,
        root=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "mine")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # levels 1..3 -> 0.1..0.3 per completion, whatever the model wrote
        assert 0.1 - 1e-9 <= row["reward/level_bonus"] <= 0.3 + 1e-9, row
    card = (tmp_path / "mine" / "README.md").read_text()
    assert "| `level_bonus` | - | 0.5 | your own: `my_rewards:level_bonus` |" in card
    evaluated = [
        json.loads(line) for line in (tmp_path / "mine" / "eval_after.jsonl").read_text().splitlines()
    ]
    assert len(evaluated) == 4 and evaluated[0]["source"] == f"{data}:2"


@pytest.mark.integration
@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "my_rewards:wrong_length",
            "error: reward level (my_rewards:wrong_length) returned 1 values for 2 completions",
        ),
        (
            "missing_mod:f",
            "error: reward_functions.level: cannot load 'missing_mod:f': ModuleNotFoundError: "
            "No module named 'missing_mod'",
        ),
    ],
)
def test_a_bad_plugin_fails_before_anything_starts(tiny_model_dir, tmp_path, spec, message):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    proc = launch(
        "--name",
        "p",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        f"reward_functions.level={spec}",
        root=tmp_path,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 2 and one_line_error(proc) == message
    assert not (tmp_path / "p").exists()


@pytest.mark.integration
def test_a_bad_data_row_or_missing_test_file_fails_before_anything_starts(tiny_model_dir, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "q?", "answer": "#### 1"}\n{"question": "no answer"}\n')
    common = [
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "data.source=jsonl",
        "--set",
        f"data.train_file={bad}",
    ]
    proc = launch("--name", "b", *common, "--set", "eval.enabled=false", root=tmp_path, timeout=120)
    assert (
        proc.returncode == 2
        and one_line_error(proc) == f"error: {bad}:2: missing field 'answer' (columns: question)"
    )
    bad.write_text('{"question": "q?", "answer": "#### 1"}\n')
    proc = launch("--name", "b", *common, root=tmp_path, timeout=120)  # eval on: it needs a test split
    assert proc.returncode == 2 and one_line_error(proc) == (
        "error: data.source is 'jsonl' but no file is configured for split 'test' (data.test_file)"
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.integration
def test_more_synthetic_test_problems_than_exist_fail_before_anything_starts(tiny_model_dir, tmp_path):
    proc = launch(
        "--name",
        "many",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "data.synthetic_levels=1",
        "--set",
        "data.synthetic_test=5000",
        root=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert one_line_error(proc).startswith("error: data.synthetic_test: only ")
    assert not (tmp_path / "many").exists()
