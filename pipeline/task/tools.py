"""Tools the model may call while it reasons, in TRL's conventions, so a TRL user's tools work unchanged.

- `rollout.tools: ["module:function", ...]`: plain functions with type hints and a Google-style
  docstring (`Args:`); transformers' `get_json_schema` turns each into the schema the tokenizer's chat
  template shows the model (`apply_chat_template(..., tools=...)`). `"calculator"` names the built-in.
- `rollout.environment: "module:Class"`: a new object per rollout (state across its turns); its public
  methods are the tools, and `reset()`, if it has one, is called first (TRL's `environment_factory`).

A call is the Hermes / Qwen format most tool-calling chat templates use:
`<tool_call>{"name": "calculator", "arguments": {"expression": "48 * 3"}}</tool_call>`.

Tools cannot hurt the run: whatever the model writes (unbalanced or huge call text, unknown tool, wrong
arguments) and whatever a tool does (raises, returns junk, runs past its deadline, allocates without
end, prints without end, crashes its process) becomes a one-line `error: ...` result for the model,
counted as a failure; nothing raises into the rollout. The built-in calculator runs in the caller's
process (it is bounded: under a millisecond on hostile input). A user's tools run in worker processes
of rank 0 (`ToolWorkers`), started from a fresh interpreter (the plugin imported once per worker) in a
session of their own, under resource limits (address space, CPU time, open files): a call past its
deadline gets its worker killed (SIGKILL to the worker's process group) and replaced, so the deadline
holds for C code that never returns to the interpreter, and nothing is left running. What the workers
print goes to `tools.log` in the run directory, capped (`ToolLog`). An environment object
(`rollout.environment`) lives in a worker of its own for its rollout's lifetime (its state is the
rollout's and nobody else's; a call of it past the deadline ends the environment, and the rollout's
later calls are answered that it is gone). A turn's calls are bounded as a whole (`tool_turn_s`): a
call starts within `timeout_s` of its turn or is answered that it was not run. A tool can still reach
whatever rank 0's user can (files, network): only configure tools you trust. Loading is checked before
anything starts (`load_toolbox`): a spec that cannot be imported, is not callable or has no schema the
template accepts is a one-line `ToolError` naming the config field.

A result reaches the model wrapped the way the tokenizer's chat template wraps a tool message
(`ToolTurns`, read from the template itself). The loop that generates through the server, runs the
calls and feeds their results back is pipeline/rollout/multi_turn.py.

Pure Python: transformers' schema helper is imported inside `schema_of` (it does not import torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from pipeline import options
from pipeline.task.reasoning import evaluate_expression

MAX_CALL_CHARS = 2048  # a call's text; longer is an error result, not parsed
MAX_RESULT_CHARS = 512  # a tool's answer as the model sees it (truncated beyond)
MAX_EXPRESSION_CHARS = 200
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
WORKER_START_S = 60.0  # a worker's start: an interpreter, the plugin's import, an environment's reset()
BACKSTOP_S = 5.0  # a worker ends itself (SIGALRM, RLIMIT_CPU) this long after a call's deadline
KILL_S = 10.0  # killing and reaping a worker, at most
MAX_OPEN_FILES = 1024  # a worker's RLIMIT_NOFILE
MAX_REPLY_BYTES = 64 * 1024  # a worker's answer to one call (results are cut to MAX_RESULT_CHARS)
_JSON_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
}
_ASSISTANT, _RESULT = "GRPO_ASSISTANT_SENTINEL", "GRPO_TOOL_RESULT_SENTINEL"


class ToolError(ValueError):
    """A tool plugin that cannot be used (one line, naming the config field)."""


# --- the built-in tool ------------------------------------------------------------------------------


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / and parentheses, for example "(48 + 24) * 3" or "125 / 4"
    """
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    value = evaluate_expression(expression)
    if value is None:
        return "error: not an arithmetic expression (numbers, + - * / and parentheses only)"
    return format_number(value)


def format_number(value: Fraction) -> str:
    """An integer as itself; anything else as a decimal of at most 6 places (`10/3` -> `3.333333`)."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


BUILT_IN = {"calculator": calculator}


# --- loading (before anything starts) ---------------------------------------------------------------


def load_object(spec: str, field_name: str):
    """`module:attribute`, imported; a one-line ToolError naming `field_name` otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ToolError(f"{field_name}: expected 'module:name', got {spec!r}")
    from pipeline.task.reward_functions import plugin_path

    plugin_path()  # as reward plugins: PYTHONPATH, then the launch directory, after the standard library
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the plugin's
        raise ToolError(f"{field_name}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ToolError(f"{field_name}: module {module_name!r} has no {attribute!r}") from None


def schema_of(fn: Callable, field_name: str) -> dict:
    """transformers' JSON schema of `fn` (what the chat template renders), or a one-line ToolError."""
    from transformers.utils import get_json_schema

    if not callable(fn):
        raise ToolError(f"{field_name}: {fn!r} is not callable")
    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers says what is missing (type hints, docstring)
        message = " ".join(str(e).split())
        raise ToolError(
            f"{field_name}: {getattr(fn, '__name__', fn)!r} has no schema the chat template "
            f"accepts: {message}"
        ) from None


@dataclass(frozen=True)
class WorkerSettings:
    """How user tools run (rollout.tool_workers, .tool_memory_mb, .tool_log_mb; the run's tools.log)."""

    workers: int = 8  # worker processes for the tool functions
    memory_mb: int = 4096  # what a worker may allocate beyond its imports (0 = no limit)
    log_path: str = ""  # where the workers' output goes; "" = this process's stderr (capped alike)
    log_mb: float = 16.0  # tools.log is rotated to tools.log.1 at this size


@dataclass
class Toolbox:
    """The tools of one rollout: name -> function (an environment's: a sample object's methods, for
    their schemas and argument checks), and their schemas for the chat template. Built-ins run here;
    the user's functions in `workers`; an environment's methods in the rollout's own worker (`for_rollout`)."""

    functions: dict[str, Callable] = field(default_factory=dict)
    schemas: list[dict] = field(default_factory=list)
    specs: dict[str, str] = field(default_factory=dict)  # a user function's name -> "module:function"
    environment: str = ""  # "module:Class"
    environment_names: frozenset[str] = frozenset()  # the environment's tools
    workers: ToolWorkers | None = None  # the user's functions run there (shared by every rollout)
    settings: WorkerSettings = field(default_factory=WorkerSettings)
    log: ToolLog | None = None
    env: RolloutEnvironment | None = None  # this rollout's environment object (for_rollout's copies)

    def __bool__(self) -> bool:
        return bool(self.functions)

    @property
    def names(self) -> list[str]:
        """Every tool's name, the environment's included (from the schemas: no object is made)."""
        return [schema["function"]["name"] for schema in self.schemas]

    def for_rollout(self) -> Toolbox:
        """The tools for one rollout: with an environment, a fresh object (reset) in a worker of its
        own, started at the rollout's first call of it (`close` ends it)."""
        if not self.environment:
            return self
        hello = {"functions": {}, "environment": self.environment, "memory_mb": self.settings.memory_mb}
        return dataclasses.replace(self, env=RolloutEnvironment(hello, self.log))

    def close(self) -> None:
        """End this rollout's environment worker, if it has one (the function workers stay)."""
        if self.env is not None:
            self.env.close()

    def call(self, call: ToolCall, timeout_s: float, start_by: float | None = None) -> ToolResult:
        """Run one parsed call within `timeout_s`; every failure is an error result, never an exception.
        `start_by` (time.monotonic()): a call that cannot start by then is answered that it was not run
        (the turn's bound, `tool_turn_s`); by default now + `timeout_s`."""
        if call.error:
            return ToolResult(call.name or "?", f"error: {call.error}", ok=False)
        fn = self.functions.get(call.name)
        if fn is None:
            known = ", ".join(sorted(self.functions)) or "none"
            return ToolResult(call.name, f"error: unknown tool {call.name[:64]!r} (tools: {known})", ok=False)
        problem = argument_problem(fn, call.arguments)
        if problem:
            return ToolResult(call.name, f"error: {problem}", ok=False)
        start_by = time.monotonic() + timeout_s if start_by is None else start_by
        if call.name in self.environment_names:
            if self.env is None:  # the toolbox itself, not a rollout's: no object to call
                return ToolResult(call.name, "error: no environment object (Toolbox.for_rollout)", ok=False)
            return self.env.call(call.name, call.arguments, timeout_s, start_by)
        if call.name in self.specs:
            return self.workers.call(call.name, call.arguments, timeout_s, start_by)
        return run_here(call.name, fn, call.arguments)


def environment_methods(env) -> dict[str, Callable]:
    """An environment's tools: its public methods other than `reset`."""
    return {
        name: getattr(env, name)
        for name in dir(env)
        if not name.startswith("_") and name != "reset" and callable(getattr(env, name))
    }


def load_toolbox(
    tools: list[str], environment: str | None, settings: WorkerSettings | None = None
) -> Toolbox:
    """Check and load `rollout.tools` and `rollout.environment` (one-line ToolError on any problem).
    A user's function named like a built-in replaces it. Nothing starts here: the workers start at the
    first call that needs one."""
    settings = settings or WorkerSettings()
    functions: dict[str, Callable] = {}
    specs: dict[str, str] = {}
    for i, spec in enumerate(tools):
        field_name = f"rollout.tools[{i}]"
        fn = BUILT_IN[spec] if spec in BUILT_IN else load_object(spec, field_name)
        schema_of(fn, f"{field_name} ({spec})")
        name = fn.__name__
        if name in functions and functions[name] is not BUILT_IN.get(name):
            raise ToolError(f"{field_name}: a second tool named {name!r}")
        functions[name] = fn
        if spec in BUILT_IN:
            specs.pop(name, None)
        else:  # the worker imports it by where it is defined, under the name the model calls
            specs[name] = spec
    env_names: frozenset[str] = frozenset()
    env_schemas = []
    if environment:
        factory = load_object(environment, "rollout.environment")
        if not callable(factory):
            raise ToolError(f"rollout.environment: {environment!r} is not a class")
        try:
            sample = factory()
        except Exception as e:  # noqa: BLE001 - the user's constructor
            raise ToolError(
                f"rollout.environment: {environment!r}() raised {type(e).__name__}: {e}"
            ) from None
        methods = environment_methods(sample)
        if not methods:
            raise ToolError(f"rollout.environment: {environment!r} has no public methods to offer as tools")
        env_schemas = [
            schema_of(m, f"rollout.environment ({environment}.{name})") for name, m in methods.items()
        ]
        for name in methods:  # the environment's method wins
            functions.pop(name, None)
            specs.pop(name, None)
        env_names = frozenset(methods)
    schemas = [schema_of(fn, name) for name, fn in functions.items()] + env_schemas
    if environment:
        functions.update(methods)
    log = ToolLog(settings.log_path, settings.log_mb) if (specs or environment) else None
    workers = (
        ToolWorkers({"functions": specs, "memory_mb": settings.memory_mb}, settings.workers, log)
        if specs
        else None
    )
    return Toolbox(functions, schemas, specs, environment or "", env_names, workers, settings, log)


# --- parsing what the model wrote ---------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # why the call text is not a call (then name/arguments are best effort)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text`, in order; a call that opens and never closes, is
    longer than MAX_CALL_CHARS or is not `{"name": str, "arguments": object}` JSON comes back with
    `error` set (the model gets that as the tool's result). One pass: each character is looked at
    at most twice, whatever the text (a completion of 20,000 unclosed `<tool_call>`s included)."""
    calls = []
    position = 0
    while (start := text.find(CALL_OPEN, position)) >= 0:
        body = start + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body)
        if end < 0:
            calls.append(ToolCall("", {}, f"unterminated {CALL_OPEN} (no {CALL_CLOSE})"))
            break
        if end - body > MAX_CALL_CHARS:  # not even copied
            calls.append(ToolCall("", {}, f"tool call longer than {MAX_CALL_CHARS} characters"))
        else:
            calls.append(_parse_one(text[body:end]))
        position = end + len(CALL_CLOSE)
    return calls


def strip_tool_calls(text: str) -> str:
    """`text` without its call text: each `<tool_call>` up to its `</tool_call>` (or the end). One pass."""
    kept = []
    position = 0
    while (start := text.find(CALL_OPEN, position)) >= 0:
        kept.append(text[position:start])
        end = text.find(CALL_CLOSE, start + len(CALL_OPEN))
        if end < 0:
            return "".join(kept)
        position = end + len(CALL_CLOSE)
    kept.append(text[position:])
    return "".join(kept)


def _parse_one(body: str) -> ToolCall:
    if len(body) > MAX_CALL_CHARS:
        return ToolCall("", {}, f"tool call longer than {MAX_CALL_CHARS} characters")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ToolCall("", {}, 'tool call is not JSON: expected {"name": ..., "arguments": {...}}')
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("", {}, 'tool call has no "name" string')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some templates serialise the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return ToolCall(data["name"], {}, '"arguments" is not a JSON object')
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], {}, '"arguments" is not a JSON object')
    return ToolCall(data["name"], arguments)


_PARAMETERS: dict = {}  # function (a method's underlying function) -> its schema's parameters


def argument_problem(fn: Callable, arguments: dict) -> str:
    """Why `arguments` do not fit `fn`'s schema (unknown, missing, wrong JSON type), or ""."""
    key = getattr(fn, "__func__", fn)
    if key not in _PARAMETERS:
        try:
            _PARAMETERS[key] = schema_of(fn, "tool")["function"].get("parameters", {})
        except ToolError as e:
            return str(e)
    params = _PARAMETERS[key]
    properties, required = params.get("properties", {}), params.get("required", [])
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        return f"unknown argument(s) {', '.join(repr(u[:32]) for u in unknown[:3])} (expected: {', '.join(properties)})"
    missing = [name for name in required if name not in arguments]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    for name, value in arguments.items():
        wanted = _JSON_TYPES.get(properties[name].get("type", ""))
        if wanted and (not isinstance(value, wanted) or (isinstance(value, bool) and wanted is not bool)):
            return f"argument {name!r} must be a {properties[name]['type']}"
    return ""


# --- running a call ---------------------------------------------------------------------------------


@dataclass
class ToolResult:
    name: str
    text: str  # what the model reads as the tool's message
    ok: bool


def tool_turn_s(timeout_s: float) -> float:
    """The longest a turn's tool calls take, however many rollouts call: each call starts within
    `timeout_s` of the turn (or is answered that it was not run), may wait WORKER_START_S for its
    worker to start, runs at most `timeout_s`, and a worker past it is killed within KILL_S."""
    return 2 * timeout_s + WORKER_START_S + KILL_S


def run_here(name: str, fn: Callable, arguments: dict) -> ToolResult:
    """A built-in tool, in this process (they are bounded: no deadline needed)."""
    try:
        value = as_text(fn(**arguments))
    except Exception as e:  # noqa: BLE001 - a tool's exception is its result
        return ToolResult(name, f"error: {name} raised {one_line(e)}", ok=False)
    return ToolResult(name, value, ok=not value.startswith("error:"))


def one_line(e: BaseException) -> str:
    """An exception as one line: its type, and its message if it has one."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}"[:MAX_RESULT_CHARS] if message else type(e).__name__


class ToolLog:
    """What the tool workers print (their stdout and stderr, C-level writes included), appended to
    `path` (the run's tools.log), which is rotated to `path`.1 when it reaches `max_mb`: at most twice
    that on disk, the latest output kept. Without a path it goes to this process's stderr, and stops
    there after `max_mb`. Shared by the rollouts' threads."""

    def __init__(self, path: str, max_mb: float):
        self.path = Path(path) if path else None
        self.limit = max(1, int(max_mb * 2**20))
        self.lock = threading.Lock()
        self.file = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self.lock:
            if self.path is not None:
                try:
                    self._append(data)
                    return
                except OSError as e:  # the run directory cannot take it: stderr, capped, from now on
                    note = f"[tools] cannot write {self.path} ({one_line(e)}): tool output follows here\n"
                    data = note.encode() + data
                    self.path, self.size = None, 0
            if self.size < self.limit:
                data = data[: self.limit - self.size]
                self.size += len(data)
                with contextlib.suppress(OSError):
                    os.write(2, data if self.size < self.limit else data + b"\n[tools] output cap reached\n")

    def _append(self, data: bytes) -> None:
        while data:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "ab")  # noqa: SIM115 - kept open between writes
                self.size = self.file.tell()
            if self.size >= self.limit:
                self.file.close()
                self.file = None
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                continue
            part = data[: self.limit - self.size]
            self.file.write(part)
            self.size += len(part)
            data = data[len(part) :]
        self.file.flush()

    def note(self, text: str) -> None:
        """A line of the runner's own (a worker killed or crashed)."""
        self.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')} tools] {text}\n".encode())


class _WorkerGone(Exception):
    """The worker cannot answer any more (it exited, crashed or answered garbage); the message says why."""


# A worker is a fresh interpreter: the parent's sys.path comes first (in the hello), then this module.
_BOOT = (
    "import json, os, sys; requests = os.fdopen(int(sys.argv[1]), 'rb'); "
    "hello = json.loads(requests.readline()); sys.path[:] = hello['path']; "
    "from pipeline.task.tools import serve_worker; serve_worker(requests, int(sys.argv[2]), hello)"
)


class _Worker:
    """One worker process, the parent's side: requests go down a pipe, answers come up another, and
    what it prints comes up a third into the log while the parent waits for an answer. Used by one
    thread at a time."""

    def __init__(self, hello: dict, log: ToolLog):
        self.log = log
        env = {
            name: value for name, value in os.environ.items() if name != options.TOKEN_ENV
        }  # no secret to read
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(request_r), str(reply_w)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(request_r, reply_w),
                start_new_session=True,  # its own process group: a kill takes whatever the tool started
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        except BaseException:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            raise
        os.close(request_r)
        os.close(reply_w)
        self.requests, self.replies, self.output = request_w, reply_r, self.proc.stdout
        os.set_blocking(reply_r, False)
        os.set_blocking(self.output.fileno(), False)
        self.buffer = b""
        self.ready = False
        self.alive = True
        self.killed = False  # by `kill`: the workers were closed
        self._end = weakref.finalize(self, _end_worker, self.proc, request_w, reply_r)
        self.send({**hello, "path": sys.path})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.requests, data) :]
        except OSError as e:  # BrokenPipeError: it exited
            raise _WorkerGone(self.exit_status(f"stopped reading ({e.strerror})")) from None

    def receive(self, deadline: float) -> dict | None:
        """Its next answer, or None at `deadline` (time.monotonic()); what it prints meanwhile goes to
        the log. _WorkerGone if it exits or answers garbage."""
        poll = select.poll()  # not select.select: a trainer's descriptors can be past FD_SETSIZE
        poll.register(self.replies, select.POLLIN)
        if not self.output.closed:
            poll.register(self.output.fileno(), select.POLLIN)
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for fd, _ in poll.poll(math.ceil(left * 1000)):
                if fd == self.replies:
                    chunk = os.read(self.replies, MAX_REPLY_BYTES)
                    if not chunk:
                        self.drain()
                        raise _WorkerGone(self.exit_status("exited"))
                    self.buffer += chunk
                    if len(self.buffer) > MAX_REPLY_BYTES:
                        raise _WorkerGone(f"answered more than {MAX_REPLY_BYTES} bytes")
                elif not self.drain():  # its output closed (a tool may close it): stop watching
                    poll.unregister(fd)
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            raise _WorkerGone("answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise _WorkerGone("answered something that is not a JSON object")
        return answer

    def drain(self) -> bool:
        """What it printed so far, into the log; False once its output is closed."""
        if self.output.closed:
            return False
        try:
            while chunk := os.read(self.output.fileno(), 1 << 16):
                self.log.write(chunk)
        except BlockingIOError:
            return True
        return False

    def exit_status(self, what: str) -> str:
        try:
            code = self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return what
        if self.killed:
            return f"{what}: the tool workers were closed"
        if code < 0:
            name = signal.Signals(-code).name
            why = {
                "SIGXCPU": "its CPU-time limit",
                "SIGKILL": "killed, perhaps out of memory",
            }.get(name, "")
            return f"{what}: {name}" + (f" ({why})" if why else "")
        return f"{what} with code {code}"

    def start(self) -> None:
        """Wait for the worker to be ready (its tools imported, its environment made), WORKER_START_S at
        most; _WorkerGone if it cannot start."""
        if self.ready:
            return
        answer = self.receive(time.monotonic() + WORKER_START_S)
        if answer is None:
            raise _WorkerGone(f"did not start within {WORKER_START_S:g}s")
        if "error" in answer:
            raise _WorkerGone(f"could not load the tools: {answer['error']}")
        self.ready = True

    def call(self, name: str, arguments: dict, timeout_s: float) -> ToolResult:
        """`name(**arguments)` in the worker within `timeout_s`: past it the worker is killed (`alive`
        is False after, as after a crash; the caller replaces it). Never raises."""
        try:
            self.start()
            self.send({"name": name, "arguments": arguments, "timeout": timeout_s})
            answer = self.receive(time.monotonic() + timeout_s)
        except Exception as e:  # noqa: BLE001 - _WorkerGone, or anything unforeseen: this worker is done
            why = str(e) if isinstance(e, _WorkerGone) else one_line(e)
            self.close()
            self.log.note(f"worker {self.pid} ({name}): {why}")
            return ToolResult(name, f"error: {name} failed: its worker {why[:200]}", ok=False)
        if answer is None:
            self.close()
            self.log.note(f"worker {self.pid}: {name} ran past {timeout_s:g}s: killed")
            return ToolResult(name, f"error: {name} ran past {timeout_s:g}s", ok=False)
        self.drain()
        if "error" in answer:
            return ToolResult(
                name, f"error: {name} raised {str(answer['error'])[:MAX_RESULT_CHARS]}", ok=False
            )
        value = as_text(answer.get("value", ""))
        return ToolResult(name, value, ok=not value.startswith("error:"))

    def kill(self) -> None:
        """SIGKILL to its process group, from any thread (`close` is its caller's)."""
        if self.alive and self.proc.returncode is None:
            self.killed = True
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill it (and whatever it started), reap it, keep what it printed."""
        self.alive = False
        if self._end.alive:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.proc.wait(KILL_S)
            self.drain()
            self._end()


def _end_worker(proc: subprocess.Popen, *fds: int) -> None:
    """A worker's end, at `close` or when its object is collected (or at exit): killed, reaped, closed."""
    if proc.returncode is None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(KILL_S)
    for fd in fds:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            os.close(fd)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.stdout.close()


class ToolWorkers:
    """Rank 0's worker processes for the user's tool functions, shared by every rollout: at most
    `size`, each started when first needed and reused; a worker killed at a deadline (or crashed) is
    replaced at once (its successor starts while the others work). No thread is started per call."""

    def __init__(self, hello: dict, size: int, log: ToolLog):
        self.hello, self.size, self.log = hello, size, log
        self.slots = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.started: weakref.WeakSet[_Worker] = weakref.WeakSet()  # idle or busy: what `close` ends
        self.closed = False

    def call(self, name: str, arguments: dict, timeout_s: float, start_by: float) -> ToolResult:
        if self.closed:
            return ToolResult(name, f"error: {name} was not run: the tool workers are closed", ok=False)
        left = start_by - time.monotonic()  # nothing starts after it, or a turn would have no bound
        if left < 0 or not self.slots.acquire(timeout=left):
            return ToolResult(
                name,
                f"error: {name} was not run: its turn's {timeout_s:g}s passed before one of the "
                f"{self.size} tool workers was free (rollout.tool_workers)",
                ok=False,
            )
        worker = None
        try:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            if worker is None:
                worker = self.start()
            return worker.call(name, arguments, timeout_s)
        except (OSError, ValueError) as e:  # no process to be had (process or memory limit)
            self.log.note(f"cannot start a tool worker: {one_line(e)}")
            return ToolResult(
                name, f"error: {name} was not run: cannot start a tool worker ({one_line(e)})", ok=False
            )
        finally:
            if worker is not None and not worker.alive:
                try:
                    worker = self.start()  # its successor starts now
                except (OSError, ValueError):
                    worker = None  # the next call tries again
            if worker is not None:
                with self.lock:
                    if not self.closed:
                        self.idle.append(worker)
                if self.closed:  # closed while it worked
                    worker.close()
            self.slots.release()

    def start(self) -> _Worker:
        with self.lock:
            if self.closed:
                raise ValueError("the tool workers are closed")
            worker = _Worker(self.hello, self.log)
            self.started.add(worker)
        return worker

    def close(self) -> None:
        """Kill every worker, the busy ones too (their calls answer an error); later calls are not run."""
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
            busy = [worker for worker in self.started if worker not in idle]
        for worker in busy:  # only killed: its caller sees it end, and reaps it and closes its pipes
            worker.kill()
        for worker in idle:
            worker.close()


class RolloutEnvironment:
    """One rollout's environment object (rollout.environment), in a worker of its own for the rollout's
    lifetime, started at its first call. A call past its deadline kills the worker and with it the
    object's state: the rollout's later calls are answered that the environment is gone."""

    def __init__(self, hello: dict, log: ToolLog):
        self.hello, self.log = hello, log
        self.lock = threading.Lock()
        self.worker: _Worker | None = None
        self.gone = ""

    def call(self, name: str, arguments: dict, timeout_s: float, start_by: float) -> ToolResult:
        with self.lock:
            if self.gone:
                return ToolResult(name, f"error: the environment is gone: {self.gone}", ok=False)
            if time.monotonic() > start_by:
                return ToolResult(
                    name, f"error: {name} was not run: its turn's {timeout_s:g}s had passed", ok=False
                )
            if self.worker is None:
                try:
                    self.worker = _Worker(self.hello, self.log)
                except (OSError, ValueError) as e:
                    self.log.note(f"cannot start an environment worker: {one_line(e)}")
                    return ToolResult(
                        name, f"error: {name} was not run: cannot start its worker ({one_line(e)})", ok=False
                    )
            result = self.worker.call(name, arguments, timeout_s)
            if not self.worker.alive:
                self.gone = (
                    f"its worker ended at a call of {name} ({result.text.removeprefix('error: ')[:200]})"
                )
            return result

    def close(self) -> None:
        with self.lock:
            if self.worker is not None:
                self.worker.close()


def serve_worker(requests, replies_fd: int, hello: dict) -> None:
    """A worker's side (its process's main loop): limit the process, load the tools (an environment:
    make the object and reset it), then answer one call per request line until the parent closes the
    pipe. Each call is bounded here too (SIGALRM, RLIMIT_CPU), in case the parent is gone."""
    import resource

    replies = os.fdopen(replies_fd, "wb", buffering=0)

    def answer(message: dict) -> None:
        replies.write((json.dumps(message) + "\n").encode())

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    try:
        tools = {name: load_object(spec, name) for name, spec in hello["functions"].items()}
        if hello.get("environment"):
            env = load_object(hello["environment"], "rollout.environment")()
            if callable(getattr(env, "reset", None)):
                env.reset()
            tools.update(environment_methods(env))
    except BaseException as e:  # noqa: BLE001 - the plugin's
        answer({"error": one_line(e)})
        return
    if hello.get("memory_mb"):  # what a call may allocate on top of the interpreter and the imports
        limit = _address_space() + hello["memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    # past a call's backstop, or once the parent is gone (the pipe's end), the worker ends and with it
    # whatever its tools started (its process group); C code that holds the interpreter meets RLIMIT_CPU
    signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))
    answer({"ready": True})
    for line in requests:
        request = json.loads(line)
        backstop = math.ceil(request["timeout"] + BACKSTOP_S)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = math.ceil(usage.ru_utime + usage.ru_stime) + backstop
        resource.setrlimit(
            resource.RLIMIT_CPU, (cpu if cpu_hard == resource.RLIM_INFINITY else min(cpu, cpu_hard), cpu_hard)
        )
        signal.alarm(backstop)
        try:
            reply = {"value": as_text(tools[request["name"]](**request["arguments"]))}
        except BaseException as e:  # noqa: BLE001 - a tool's exception (SystemExit too) is its result
            reply = {"error": one_line(e)}
        finally:
            signal.alarm(0)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a tool may have closed or replaced it
                stream.flush()
        answer(reply)
    os.killpg(0, signal.SIGKILL)


def _address_space() -> int:
    """This process's virtual memory size, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def as_text(value) -> str:
    """A tool's return value as the model sees it: strings as they are, else JSON (or str), one size."""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            value = str(value)
    return value if len(value) <= MAX_RESULT_CHARS else value[:MAX_RESULT_CHARS] + " [truncated]"


# --- a result as the model reads it -----------------------------------------------------------------


@dataclass(frozen=True)
class ToolTurns:
    """How the chat template wraps a tool's result after the model's turn: `before` closes the
    assistant's turn and opens the tool's, `after` closes it and opens the assistant's next turn.
    Read from the template itself by rendering a conversation with sentinels."""

    before: str
    after: str

    @classmethod
    def of(cls, tokenizer, tools: list[dict] | None = None) -> ToolTurns:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ToolError("rollout.tools: the tokenizer has no chat template to wrap tool results in")
        messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _ASSISTANT}]
        try:
            three = tokenizer.apply_chat_template(
                messages + [{"role": "tool", "content": _RESULT}],
                tools=tools,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # noqa: BLE001 - a template that has no tool role
            raise ToolError(
                f"rollout.tools: the chat template cannot render a tool message: {type(e).__name__}: "
                f"{' '.join(str(e).split())}"
            ) from None
        if (
            three.count(_ASSISTANT) != 1
            or three.count(_RESULT) != 1
            or three.index(_ASSISTANT) > three.index(_RESULT)
        ):
            raise ToolError(
                "rollout.tools: the chat template does not render an assistant turn followed by a "
                "tool message"
            )
        start, middle = three.index(_ASSISTANT) + len(_ASSISTANT), three.index(_RESULT)
        return cls(three[start:middle], three[middle + len(_RESULT) :])

    def token_ids(self, tokenizer, result: str) -> list[int]:
        """The tool turn's tokens: the template's own around the result, and the result's text with any
        special-token strings in it split as plain text (a tool cannot open or close turns)."""

        def plain(text: str, split: bool) -> list[int]:
            return (
                tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
                if text
                else []
            )

        return plain(self.before, False) + plain(result, True) + plain(self.after, False)
