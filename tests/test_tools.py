"""Tools in rollouts, the pure part (pipeline/task/tools.py): loading TRL-style plugins, the built-in
calculator, parsing what the model writes, and running calls so that nothing a tool or the model does
can raise into a rollout or hang it."""

import textwrap
import time

import pytest

from pipeline.task.tools import (
    MAX_RESULT_CHARS,
    ToolCall,
    ToolError,
    calculator,
    load_toolbox,
    parse_tool_calls,
)

PLUGIN = '''
import time


def calculator(expression: str) -> str:
    """A user's calculator that replaces the built-in one.

    Args:
        expression: the arithmetic to do
    """
    return "users:" + expression


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first
        b: second
    """
    return a + b


def explode(x: str) -> str:
    """Always raises.

    Args:
        x: anything
    """
    raise RuntimeError("boom\\nwith a second line")


def sleepy(x: str) -> str:
    """Never returns in time.

    Args:
        x: anything
    """
    time.sleep(30)
    return x


class Unprintable:
    def __str__(self):
        raise ValueError("no")


def junk(x: str) -> str:
    """Returns something that is not text.

    Args:
        x: what kind of junk
    """
    return {"huge": "z" * 100000} if x == "huge" else Unprintable()


def undocumented(x):
    return x


class Counter:
    """An environment: state across one rollout's turns."""

    def __init__(self):
        self.count = 0
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1
        self.count = 0

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much
        """
        self.count += by
        return self.count


class NoTools:
    def _private(self):
        return 1
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "user_tools.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_tools"


def test_the_calculator_is_exact_and_answers_errors_in_one_line():
    assert calculator("(48 + 24) * 3") == "216"
    assert calculator("125 / 4") == "31.25"
    assert calculator("10/3") == "3.333333"
    assert calculator("1,234 * 1,000") == "1234000"
    for hostile in ("1/0", "__import__('os').system('true')", "2 ** 99999", "9" * 500, "", "(1 + 2"):
        answer = calculator(hostile)
        assert answer.startswith("error: ") and "\n" not in answer, (hostile, answer)


def test_built_in_and_user_tools_load_with_their_schemas(plugin):
    toolbox = load_toolbox(["calculator", f"{plugin}:add"], None)
    assert set(toolbox.functions) == {"calculator", "add"}
    names = [s["function"]["name"] for s in toolbox.schemas]
    assert names == ["calculator", "add"]
    assert toolbox.schemas[0]["function"]["parameters"]["required"] == ["expression"]
    # a user's function with the built-in's name and signature replaces it
    replaced = load_toolbox(["calculator", f"{plugin}:calculator"], None)
    assert replaced.call(ToolCall("calculator", {"expression": "1+1"}), 5).text == "users:1+1"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_module_xyz:f", "rollout.tools[0]: cannot import 'no_such_module_xyz'"),
        ("json:no_such_function", "rollout.tools[0]: module 'json' has no 'no_such_function'"),
        ("justaname", "rollout.tools[0]: expected 'module:name'"),
        ("math:pi", "is not callable"),
    ],
)
def test_a_plugin_that_cannot_be_used_is_a_one_line_error(spec, message):
    with pytest.raises(ToolError) as err:
        load_toolbox([spec], None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_function_without_a_schema_is_refused_before_anything_starts(plugin):
    with pytest.raises(
        ToolError, match=r"rollout.tools\[1\] .*undocumented.*no schema the chat template accepts"
    ) as err:
        load_toolbox(["calculator", f"{plugin}:undocumented"], None)
    assert "\n" not in str(err.value)


def test_an_environment_gives_each_rollout_fresh_state(plugin):
    toolbox = load_toolbox([f"{plugin}:add"], f"{plugin}:Counter")
    assert sorted(s["function"]["name"] for s in toolbox.schemas) == ["add", "increment"]
    first, second = toolbox.for_rollout(), toolbox.for_rollout()
    assert first.call(ToolCall("increment", {"by": 2}), 5).text == "2"
    assert first.call(ToolCall("increment", {"by": 3}), 5).text == "5"  # state across turns
    assert second.call(ToolCall("increment", {"by": 1}), 5).text == "1"  # a rollout of its own
    assert first.functions["increment"].__self__.resets == 1
    with pytest.raises(ToolError, match="rollout.environment: .*NoTools.* no public methods"):
        load_toolbox([], f"{plugin}:NoTools")


def test_calls_are_parsed_from_the_templates_format():
    text = (
        'I need 48 * 3. <tool_call>{"name": "calculator", "arguments": {"expression": "48 * 3"}}</tool_call>'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "48 * 3"}, ""),
        ("add", {"a": 1, "b": 2}, ""),
    ]
    assert parse_tool_calls("no call here") == []


@pytest.mark.parametrize(
    "text,error",
    [
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}', "unterminated"),
        ("<tool_call>" + "x" * 5000 + "</tool_call>", "longer than"),
        ("<tool_call>calculator(1+1)</tool_call>", "not JSON"),
        ('<tool_call>["calculator"]</tool_call>', 'no "name"'),
        ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "not a JSON object"),
        ("<tool_call>" + "[" * 100000 + "</tool_call>", "longer than"),
    ],
)
def test_hostile_call_text_is_an_error_result(text, error):
    (call,) = parse_tool_calls(text)
    assert error in call.error
    result = load_toolbox(["calculator"], None).call(call, 5)
    assert not result.ok and result.text.startswith("error: ") and "\n" not in result.text


def test_wrong_calls_and_bad_tools_are_error_results_never_exceptions(plugin):
    toolbox = load_toolbox(
        ["calculator", f"{plugin}:add", f"{plugin}:explode", f"{plugin}:sleepy", f"{plugin}:junk"], None
    )
    cases = {
        "unknown tool": ToolCall("rm_rf", {}),
        "missing argument": ToolCall("add", {"a": 1}),
        "unknown argument": ToolCall("add", {"a": 1, "b": 2, "c": 3}),
        "must be a integer": ToolCall("add", {"a": "1", "b": 2}),
        "raised RuntimeError: boom with a second line": ToolCall("explode", {"x": "y"}),
    }
    for expected, call in cases.items():
        result = toolbox.call(call, 5)
        assert not result.ok and expected in result.text and "\n" not in result.text, (expected, result)
    assert toolbox.call(ToolCall("add", {"a": 2, "b": 3}), 5).text == "5"
    start = time.monotonic()
    hung = toolbox.call(ToolCall("sleepy", {"x": "y"}), 0.3)
    assert time.monotonic() - start < 2 and not hung.ok and "ran past 0.3s" in hung.text
    unprintable = toolbox.call(ToolCall("junk", {"x": "object"}), 5)
    assert not unprintable.ok and "raised ValueError" in unprintable.text
    huge = toolbox.call(ToolCall("junk", {"x": "huge"}), 5)
    assert (
        huge.ok
        and len(huge.text) <= MAX_RESULT_CHARS + len(" [truncated]")
        and huge.text.endswith("[truncated]")
    )


def test_rewards_see_the_rollout_as_trls_message_list():
    """A two-call rollout, assembled turn by turn as the loop does, becomes TRL's message-list
    completion: assistant turns with their calls parsed out into `tool_calls`, a tool message per
    call; the built-in rewards score the last assistant message, and a plugin sees every message."""
    from pipeline.embedded.tiny_model import build_tokenizer
    from pipeline.rollout.multi_turn import Conversation
    from pipeline.task.reward_functions import score_completions
    from pipeline.task.tools import CALL_CLOSE, CALL_OPEN, ToolResult, ToolTurns

    tokenizer = build_tokenizer(
        ["Tom has 12 apples. 12 * 4 = 48\n<answer>\n48\n</answer>"] * 20, 300, True, (CALL_OPEN, CALL_CLOSE)
    )
    turns = ToolTurns.of(tokenizer)
    toolbox = load_toolbox(["calculator"], None)
    conversation = Conversation([1, 2], toolbox)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 4"}}</tool_call>'
    final = "<reasoning>\n12 * 4 = 48\n48 + 2 = 50\n</reasoning>\n<answer>\n50\n</answer>"
    for text, results in (
        (call, ["48"]),
        ("so far 48" + call.replace("12 * 4", "48 + 2"), ["50"]),
        (final, None),
    ):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + (
            [tokenizer.eos_token_id] if results is None else []
        )
        conversation.add_model_turn(
            {"token_ids": ids, "logprobs": [-0.5] * len(ids), "finish_reason": "stop"}, tokenizer
        )
        if results:
            tool = [ToolResult("calculator", r, ok=True) for r in results]
            conversation.add_tool_turn(turns.token_ids(tokenizer, "\n".join(results)), tool)
    messages = conversation.messages()
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[0] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 4"}}}
        ],
    }
    assert messages[2]["content"] == "so far 48"
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"expression": "48 + 2"}
    assert (
        messages[1] == {"role": "tool", "name": "calculator", "content": "48"}
        and messages[3]["content"] == "50"
    )
    assert messages[4] == {"role": "assistant", "content": final}
    assert sum(conversation.loss_mask) == len(conversation.token_ids) - sum(
        len(turns.token_ids(tokenizer, r)) for r in ("48", "50")
    )

    def counts_calls(prompts=None, completions=(), **kwargs):
        return [sum(len(m.get("tool_calls", [])) for m in c) for c in completions]

    from pipeline.task.reward_functions import BUILTIN_REWARDS, Reward

    rewards = {**BUILTIN_REWARDS, "calls": Reward("calls", counts_calls, None, source="test:counts_calls")}
    _, per_reward = score_completions([messages], ["50"], rewards=rewards)
    assert (
        per_reward["strict_format"] == [0.5]
        and per_reward["correctness"] == [2.0]
        and per_reward["calls"] == [2.0]
    )
