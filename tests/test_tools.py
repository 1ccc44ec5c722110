"""Tools in rollouts, without a server (pipeline/task/tools.py): loading TRL-style plugins, the built-in
calculator, parsing what the model writes, and running calls in real worker processes so that nothing
a tool or the model does can raise into a rollout, hang it, or outlive its deadline."""

import contextlib
import subprocess
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from pipeline.task.tools import (
    MAX_RESULT_CHARS,
    ToolCall,
    ToolError,
    WorkerSettings,
    calculator,
    load_toolbox,
    parse_tool_calls,
    strip_tool_calls,
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


def crunch(digits: int) -> str:
    """Arithmetic in C that never returns to the interpreter for many seconds.

    Args:
        digits: how big
    """
    return str(3**digits % 10)


def hog(mb: int) -> str:
    """Allocates memory.

    Args:
        mb: how much
    """
    return str(len(bytearray(mb * 2**20)))


def chatter(kb: int) -> str:
    """Prints a lot, through Python and straight to the descriptors, then says where it stopped.

    Args:
        kb: how much
    """
    import os
    import sys

    for i in range(kb):
        print(f"line {i:06d} " + "p" * 1000)
        os.write(2, b"c" * 1024)
    sys.stdout.write("the last line\\n")
    return "done"


def die(how: str) -> str:
    """Ends its own process.

    Args:
        how: exit or segfault
    """
    import ctypes
    import os

    if how == "segfault":
        ctypes.string_at(0)
    os._exit(3)


def spawn(seconds: int) -> str:
    """Starts a process that outlives the call, and says which (the worker's pid, then the child's).

    Args:
        seconds: how long the child sleeps
    """
    import os
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    return f"{os.getpid()} {child.pid}"


class Counter:
    """An environment: state across one rollout's turns."""

    def __init__(self):
        self.count = 0
        self.resets = 0

    def reset(self) -> None:  # run once per rollout: the count starts at 10
        self.resets += 1
        self.count += 10

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much
        """
        self.count += by
        return self.count

    def stall(self, seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "awake"


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
    assert sorted(s["function"]["name"] for s in toolbox.schemas) == ["add", "increment", "stall"]
    first, second = toolbox.for_rollout(), toolbox.for_rollout()
    try:
        # reset() ran once in each (10), then the calls
        assert first.call(ToolCall("increment", {"by": 2}), 5).text == "12"
        assert first.call(ToolCall("increment", {"by": 3}), 5).text == "15"  # state across turns
        assert second.call(ToolCall("increment", {"by": 1}), 5).text == "11"  # a rollout of its own
    finally:
        first.close(), second.close()
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


# --- containment: user tools run in worker processes, killed at the deadline -------------------------


def children() -> list[psutil.Process]:
    """This process's tool workers and what they started (not the session's servers or SLURM daemons)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "serve_worker" in " ".join(child.cmdline()):
                found += [child, *child.children(recursive=True)]
    return list({p.pid: p for p in found}.values())


def test_a_tool_in_c_code_is_killed_at_its_deadline(plugin):
    """A deadline the tool cannot ignore: arithmetic in C (which in a thread held the interpreter for
    the whole computation and came back seconds late, as a success) is killed at 0.2 s, its worker
    replaced, and the next call is answered."""
    toolbox = load_toolbox([f"{plugin}:crunch", f"{plugin}:add"], None, WorkerSettings(workers=1))
    assert toolbox.call(ToolCall("add", {"a": 1, "b": 2}), 30).text == "3"  # the worker is up
    workers = children()
    start = time.monotonic()
    result = toolbox.call(ToolCall("crunch", {"digits": 30_000_000}), 0.2)  # ~10 s of C here
    took = time.monotonic() - start
    assert not result.ok and result.text == "error: crunch ran past 0.2s", f"{result} after {took:.1f}s"
    assert took < 3, f"the call came back after {took:.1f}s"
    assert len(workers) == 1 and not workers[0].is_running()  # killed and reaped
    assert toolbox.call(ToolCall("add", {"a": 2, "b": 3}), 30).text == "5"  # its successor answers
    toolbox.workers.close()
    assert not children()


def test_timed_out_calls_leave_no_thread_or_process_behind(plugin):
    """200 calls past their deadline: each worker is killed and replaced, the process's thread count
    is what it was (a thread per abandoned call, before: 200, until the thread limit killed the run)."""
    toolbox = load_toolbox([f"{plugin}:sleepy"], None, WorkerSettings(workers=8))
    me = psutil.Process()
    threads = (threading.active_count(), me.num_threads())
    with ThreadPoolExecutor(8) as pool:  # as the rollout loop calls: several rollouts at once
        results = list(pool.map(lambda _: toolbox.call(ToolCall("sleepy", {"x": "y"}), 0.05), range(200)))
    assert all(not r.ok and r.text == "error: sleepy ran past 0.05s" for r in results)
    assert (threading.active_count(), me.num_threads()) == threads
    assert len(children()) <= 8  # the replacements, idle
    toolbox.workers.close()
    assert not children()


def test_at_the_process_limit_a_call_is_an_error_result(plugin, monkeypatch):
    """No process (or thread) to be had: the call is an error result, not an exception in the rollout."""

    def refuse(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    toolbox = load_toolbox([f"{plugin}:add"], f"{plugin}:Counter").for_rollout()
    for name, arguments in (("add", {"a": 1, "b": 2}), ("increment", {"by": 1})):
        result = toolbox.call(ToolCall(name, arguments), 5)
        assert not result.ok and "cannot start" in result.text and "Resource temporarily" in result.text


def test_a_tools_memory_is_limited(plugin):
    """rollout.tool_memory_mb: beyond it an allocation fails in the worker (MemoryError, an error
    result); below it the tool works, and the worker goes on."""
    toolbox = load_toolbox([f"{plugin}:hog"], None, WorkerSettings(workers=1, memory_mb=256))
    assert toolbox.call(ToolCall("hog", {"mb": 64}), 30).text == str(64 * 2**20)
    big = toolbox.call(ToolCall("hog", {"mb": 2048}), 30)
    assert not big.ok and big.text == "error: hog raised MemoryError", big
    assert toolbox.call(ToolCall("hog", {"mb": 64}), 30).ok
    toolbox.workers.close()


def test_what_tools_print_goes_to_a_capped_log(plugin, tmp_path, capfd):
    """A tool's output (print, and writes straight to its descriptors) goes to tools.log, not to the
    trainer's own output, and stays within rollout.tool_log_mb (rotated once to tools.log.1)."""
    log = tmp_path / "run" / "tools.log"
    settings = WorkerSettings(workers=1, log_path=str(log), log_mb=0.25)
    toolbox = load_toolbox([f"{plugin}:chatter"], None, settings)
    for _ in range(3):  # 3 x ~2 MB printed
        assert toolbox.call(ToolCall("chatter", {"kb": 1000}), 60).text == "done"
    toolbox.workers.close()
    out, err = capfd.readouterr()
    assert "line 0" not in out + err and "ccc" not in out + err
    limit = int(0.25 * 2**20)
    rotated = log.with_name("tools.log.1")
    assert log.stat().st_size <= limit and rotated.stat().st_size <= limit
    assert sorted(p.name for p in log.parent.iterdir()) == ["tools.log", "tools.log.1"]
    assert (rotated.read_bytes() + log.read_bytes()).rstrip().endswith(b"the last line")  # the latest kept


def test_a_crashing_tool_is_an_error_result_and_its_worker_is_replaced(plugin):
    toolbox = load_toolbox([f"{plugin}:die", f"{plugin}:add"], None, WorkerSettings(workers=1))
    for how, why in (("exit", "exited with code 3"), ("segfault", "SIGSEGV")):
        result = toolbox.call(ToolCall("die", {"how": how}), 30)
        assert not result.ok and why in result.text and "\n" not in result.text, result
        assert toolbox.call(ToolCall("add", {"a": 1, "b": 1}), 30).text == "2"
    toolbox.workers.close()


def test_an_environment_past_its_deadline_is_gone_and_only_its_own(plugin):
    """A rollout's environment lives in its worker: a call past the deadline kills it (its state with
    it: the rollout's later calls are told so), another rollout's environment goes on, and closing the
    rollouts ends their workers."""
    toolbox = load_toolbox([], f"{plugin}:Counter")
    hung, fine = toolbox.for_rollout(), toolbox.for_rollout()
    try:
        assert hung.call(ToolCall("increment", {"by": 1}), 30).text == "11"
        assert fine.call(ToolCall("increment", {"by": 1}), 30).text == "11"
        start = time.monotonic()
        assert hung.call(ToolCall("stall", {"seconds": 60}), 0.2).text == "error: stall ran past 0.2s"
        assert time.monotonic() - start < 3
        later = hung.call(ToolCall("increment", {"by": 1}), 30)
        assert not later.ok and later.text.startswith("error: the environment is gone: its worker ended at")
        assert fine.call(ToolCall("increment", {"by": 1}), 30).text == "12"
        assert len(children()) == 1
    finally:
        hung.close(), fine.close()
    assert not children()


def test_a_turns_calls_are_bounded_as_a_whole(plugin):
    """More slow calls than workers: a call that cannot start by its turn's `start_by` is answered that
    it was not run (not queued behind the others), so a turn lasts about twice its timeout however many
    rollouts call."""
    toolbox = load_toolbox([f"{plugin}:sleepy"], None, WorkerSettings(workers=2))
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(lambda _: toolbox.call(ToolCall("sleepy", {"x": "y"}), 2.0, start + 0.5), range(6))
        )
    took = time.monotonic() - start
    texts = sorted(r.text for r in results)
    assert texts.count("error: sleepy ran past 2s") == 2, texts  # the two workers' calls
    assert sum("was not run: its turn's 2s passed before one of the 2" in t for t in texts) == 4, texts
    assert took < 10, took
    late = toolbox.call(ToolCall("sleepy", {"x": "y"}), 2.0, time.monotonic() - 0.1)  # a worker is free
    assert late.text.startswith("error: sleepy was not run: its turn's 2s passed"), late
    toolbox.workers.close()


def test_closing_the_workers_ends_the_busy_ones_too(plugin):
    """ToolWorkers.close (a rank leaving, however it leaves) kills the idle workers and the busy ones:
    a call under way is answered with an error, a later call is not run, and no process is left."""
    toolbox = load_toolbox([f"{plugin}:sleepy", f"{plugin}:spawn"], None, WorkerSettings(workers=2))
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(toolbox.call, ToolCall("sleepy", {"x": "y"}), 60)  # busy for 30 s
        wait_for(lambda: children())
        worker, child = map(int, toolbox.call(ToolCall("spawn", {"seconds": 600}), 30).text.split())
        assert len(children()) == 3  # the busy worker, the idle one and its child
        toolbox.workers.close()
        result = busy.result(timeout=60)
    assert (
        not result.ok
        and result.text == "error: sleepy failed: its worker exited: the tool workers were closed"
    ), result
    later = toolbox.call(ToolCall("sleepy", {"x": "y"}), 60)
    assert later.text == "error: sleepy was not run: the tool workers are closed", later
    assert not children() and not any(map(alive, (worker, child)))


PARENT = """
import threading, time
import psutil
from pipeline.task.tools import ToolCall, WorkerSettings, load_toolbox

toolbox = load_toolbox(["user_tools:sleepy", "user_tools:spawn"], None, WorkerSettings(workers=2))
threading.Thread(target=toolbox.call, args=(ToolCall("sleepy", {"x": "y"}), 2.0)).start()  # busy 30 s
while not psutil.Process().children():
    time.sleep(0.05)
print(toolbox.call(ToolCall("spawn", {"seconds": 600}), 30).text, flush=True)  # another, then idle
threading.Event().wait()
"""


def wait_for(condition, seconds: float = 120) -> None:
    """Until `condition()` holds (a bound, not a speed target: a loaded machine is slow)."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"waited {seconds:g}s"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_no_worker_or_what_it_started_outlives_its_parent(plugin, tmp_path):
    """A rank killed outright (SIGKILL: no finally, no atexit): its idle workers see the pipe's end, its
    busy ones their backstop (the call's timeout + BACKSTOP_S), and each takes its process group, what
    the tools started, with it."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        idle, child = map(int, parent.stdout.readline().split())
        pids = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert idle in pids and child in pids and len(pids) == 3, pids  # the busy worker too
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not any(map(alive, pids)))  # the busy worker's backstop is 7 s away


@pytest.mark.parametrize("server_fails", [False, True])
def test_rollouts_environment_workers_end_with_their_generation(plugin, server_fails):
    """generate_with_tools with a scripted server: each rollout's environment is its own worker, state
    across its turns; when the rollouts are done, or the server fails mid-way, no worker is left."""
    from pipeline.embedded.tiny_model import build_tokenizer
    from pipeline.rollout.multi_turn import generate_with_tools
    from pipeline.task.tools import CALL_CLOSE, CALL_OPEN, ToolTurns

    call = '<tool_call>{"name": "increment", "arguments": {"by": 1}}</tool_call>'
    tokenizer = build_tokenizer([f"Count. {call} 11 12"] * 20, 300, True, (CALL_OPEN, CALL_CLOSE))
    ids = tokenizer(call, add_special_tokens=False)["input_ids"]

    class Server:  # every rollout calls at every turn; the second request fails if asked to
        requests = 0

        def generate(self, prompt_ids, n, **kwargs):
            self.requests += 1
            if server_fails and self.requests == 2:
                raise RuntimeError("the server is gone")
            completion = {"token_ids": ids, "logprobs": [-0.1] * len(ids), "finish_reason": "stop"}
            return {"version": 0, "results": [{"completions": [completion] * n} for _ in prompt_ids]}

    toolbox = load_toolbox([], f"{plugin}:Counter")
    kwargs = dict(n=2, max_tokens=400, seed=0, params={}, toolbox=toolbox, tokenizer=tokenizer)
    kwargs |= dict(turns=ToolTurns.of(tokenizer), max_iterations=2, timeout_s=30, max_prompts=8)
    if server_fails:
        with pytest.raises(RuntimeError, match="the server is gone"):
            generate_with_tools(Server(), [[5, 6]], **kwargs)
    else:
        groups, _ = generate_with_tools(Server(), [[5, 6]], **kwargs)
        assert [c.results for c in groups[0]] == [["11", "12"], ["11", "12"]]  # each its own object
    assert not children()


# --- parsing is linear ----------------------------------------------------------------------------


def seconds_per_run(fn, text: str, runs: int) -> float:
    """The fastest of 3 timings of `runs` calls, per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(runs):
            fn(text)
        best = min(best, time.perf_counter() - start)
    return best / runs


@pytest.mark.parametrize(
    "unit",
    [
        "<tool_call>",  # opens that never close (quadratic before: 4,096 took 0.8 s, 20,000 19 s)
        "<tool_call>x</tool_call>",  # many closed calls, each an error
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and ',
        "</tool_call><tool_call>",
    ],
)
@pytest.mark.parametrize("fn", [parse_tool_calls, strip_tool_calls])
def test_parsing_is_linear_in_the_text(unit, fn):
    """The time of 8n units is about 8 times that of n (quadratic would be 64 times): compared, not
    timed against a threshold, with runs repeated so that each timing is tens of milliseconds."""
    n = 2000
    start = time.perf_counter()
    fn(unit * n)
    once = time.perf_counter() - start
    runs = max(1, int(0.02 / max(once, 1e-7)))
    small = seconds_per_run(fn, unit * n, runs)
    large = seconds_per_run(fn, unit * (8 * n), runs)
    assert large / small < 24, f"{unit!r}: {small * 1e3:.3f} ms for {n}, {large * 1e3:.3f} ms for {8 * n}"
