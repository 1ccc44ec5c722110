"""Tools the model may call while it reasons, in TRL's conventions, so a TRL user's tools work unchanged.

- `rollout.tools: ["module:function", ...]`: plain functions with type hints and a Google-style
  docstring (`Args:`); transformers' `get_json_schema` turns each into the schema the tokenizer's chat
  template shows the model (`apply_chat_template(..., tools=...)`). `"calculator"` names the built-in.
- `rollout.environment: "module:Class"`: a new object per rollout (state across its turns); its public
  methods are the tools, and `reset()`, if it has one, is called first (TRL's `environment_factory`).

A call is the Hermes / Qwen format most tool-calling chat templates use:
`<tool_call>{"name": "calculator", "arguments": {"expression": "48 * 3"}}</tool_call>`.

Tools cannot hurt the run: whatever the model writes (unbalanced or huge call text, unknown tool, wrong
arguments) and whatever a tool does (raises, returns junk, runs past `timeout_s`) becomes a one-line
`error: ...` result for the model, counted as a failure; nothing raises into the rollout. Tools run in
the trainer's rank-0 process, each call in a daemon thread under the deadline: a call past it is
abandoned (its thread cannot be killed, so a tool that never returns keeps one idle thread), and a tool
can reach whatever that process can (files, network): only configure tools you trust. Loading is
checked before anything starts (`load_toolbox`): a spec that cannot be imported, is not callable or
has no schema the template accepts is a one-line `ToolError` naming the config field.

A result reaches the model wrapped the way the tokenizer's chat template wraps a tool message
(`ToolTurns`, read from the template itself). The loop that generates through the server, runs the
calls and feeds their results back is pipeline/rollout/multi_turn.py.

Pure Python: transformers' schema helper is imported inside `schema_of` (it does not import torch).
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from pipeline.task.reasoning import evaluate_expression

MAX_CALL_CHARS = 2048  # a call's text; longer is an error result, not parsed
MAX_RESULT_CHARS = 512  # a tool's answer as the model sees it (truncated beyond)
MAX_EXPRESSION_CHARS = 200
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
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


@dataclass
class Toolbox:
    """The tools of one rollout: name -> function, and their schemas for the chat template."""

    functions: dict[str, Callable] = field(default_factory=dict)
    schemas: list[dict] = field(default_factory=list)
    environment_factory: Callable | None = None

    def __bool__(self) -> bool:
        return bool(self.functions) or self.environment_factory is not None

    @property
    def names(self) -> list[str]:
        """Every tool's name, the environment's included (from the schemas: no object is made)."""
        return [schema["function"]["name"] for schema in self.schemas]

    def for_rollout(self) -> Toolbox:
        """The tools for one rollout: with an environment, a fresh object (reset) whose methods join
        the functions (an environment's method wins over a function of the same name)."""
        if self.environment_factory is None:
            return self
        env = self.environment_factory()
        if callable(getattr(env, "reset", None)):
            env.reset()
        functions = dict(self.functions)
        functions.update(environment_methods(env))
        return Toolbox(functions, self.schemas, None)

    def call(self, call: ToolCall, timeout_s: float) -> ToolResult:
        """Run one parsed call; every failure is an error result, never an exception."""
        if call.error:
            return ToolResult(call.name or "?", f"error: {call.error}", ok=False)
        fn = self.functions.get(call.name)
        if fn is None:
            known = ", ".join(sorted(self.functions)) or "none"
            return ToolResult(call.name, f"error: unknown tool {call.name[:64]!r} (tools: {known})", ok=False)
        problem = argument_problem(fn, call.arguments)
        if problem:
            return ToolResult(call.name, f"error: {problem}", ok=False)
        return run_with_deadline(call.name, fn, call.arguments, timeout_s)


def environment_methods(env) -> dict[str, Callable]:
    """An environment's tools: its public methods other than `reset`."""
    return {
        name: getattr(env, name)
        for name in dir(env)
        if not name.startswith("_") and name != "reset" and callable(getattr(env, name))
    }


def load_toolbox(tools: list[str], environment: str | None) -> Toolbox:
    """Check and load `rollout.tools` and `rollout.environment` (one-line ToolError on any problem).
    A user's function named like a built-in replaces it."""
    functions: dict[str, Callable] = {}
    for i, spec in enumerate(tools):
        field_name = f"rollout.tools[{i}]"
        fn = BUILT_IN[spec] if spec in BUILT_IN else load_object(spec, field_name)
        schema_of(fn, f"{field_name} ({spec})")
        name = fn.__name__
        if name in functions and functions[name] is not BUILT_IN.get(name):
            raise ToolError(f"{field_name}: a second tool named {name!r}")
        functions[name] = fn
    factory, env_schemas = None, []
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
    schemas = [schema_of(fn, name) for name, fn in functions.items()] + env_schemas
    return Toolbox(functions, schemas, factory)


# --- parsing what the model wrote ---------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # why the call text is not a call (then name/arguments are best effort)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text`, in order; a call that opens and never closes, is
    longer than MAX_CALL_CHARS or is not `{"name": str, "arguments": object}` JSON comes back with
    `error` set (the model gets that as the tool's result)."""
    calls = []
    for match in _CALL.finditer(text):
        calls.append(_parse_one(match.group(1)))
    tail = text[text.rfind(CALL_CLOSE) + len(CALL_CLOSE) :] if CALL_CLOSE in text else text
    if CALL_OPEN in tail:
        calls.append(ToolCall("", {}, f"unterminated {CALL_OPEN} (no {CALL_CLOSE})"))
    return calls


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


def run_with_deadline(name: str, fn: Callable, arguments: dict, timeout_s: float) -> ToolResult:
    """`fn(**arguments)` in a daemon thread; past `timeout_s`, an error result (the thread is left)."""
    out: dict = {}

    def target():
        try:
            out["value"] = as_text(fn(**arguments))
        except BaseException as e:  # noqa: BLE001 - a tool's exception is its result
            out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:MAX_RESULT_CHARS]

    thread = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return ToolResult(name, f"error: {name} ran past {timeout_s:g}s", ok=False)
    if "error" in out:
        return ToolResult(name, f"error: {name} raised {out['error']}", ok=False)
    return ToolResult(name, out["value"], ok=not out["value"].startswith("error:"))


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
