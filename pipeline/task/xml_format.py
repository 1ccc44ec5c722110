"""The answer format the recipe teaches, in one place: its tags, the system prompt that asks for it,
how a completion in it is written, how strictly one is checked, and where its answer is read from.

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

Pure Python. Every check is a linear-time string scan (no regex backtracking), so a 100k-character
completion costs microseconds.
"""

from __future__ import annotations

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
TAG_LINES = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")  # each tag on its own line

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


def format_completion(reasoning: str, answer: str) -> str:
    """A completion in the exact format (what `is_strict_format` accepts)."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def is_strict_format(text: str) -> bool:
    """Exactly `<reasoning>\\nR\\n</reasoning>\\n<answer>\\nA\\n</answer>` (trailing whitespace allowed)."""
    text = text.rstrip()
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
    if not (text.startswith(head) and text.endswith(tail)) or len(text) < len(head) + len(tail):
        return False
    parts = text[len(head) : len(text) - len(tail)].split(middle)
    if len(parts) != 2:
        return False
    return all(part and not any(tag in part for tag in TAGS) for part in parts)


def is_soft_format(text: str) -> bool:
    """Starts (after whitespace) with `<reasoning>…</reasoning>`, whitespace, `<answer>…</answer>`.

    Equivalent to re.match(r"\\s*<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", DOTALL) but
    linear: the earliest `</reasoning>` that is followed by `<answer>` is the best candidate, since
    any later one leaves less room for the closing `</answer>`.
    """
    text = text.lstrip()
    if not text.startswith("<reasoning>"):
        return False
    pos = len("<reasoning>")
    while (close := text.find("</reasoning>", pos)) >= 0:
        after = close + len("</reasoning>")
        while after < len(text) and text[after].isspace():
            after += 1
        if text.startswith("<answer>", after):
            return text.find("</answer>", after + len("<answer>")) >= 0
        pos = close + 1
    return False


def extract_xml_answer(text: str) -> str | None:
    """Text between the last `<answer>` and the first `</answer>` after it, stripped."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None
    return text[start:end].strip()


def reasoning_block(text: str) -> str:
    """The text inside the last `<reasoning>…</reasoning>`, or everything before `<answer>`."""
    start = text.rfind("<reasoning>")
    if start >= 0:
        end = text.find("</reasoning>", start)
        return text[start + len("<reasoning>") : end if end >= 0 else len(text)]
    answer = text.find("<answer>")
    return text[:answer] if answer >= 0 else text
