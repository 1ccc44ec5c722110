"""The one completion type: what generation gives back (pipeline/rollout/generate.py), what the
rewards and the loss read, and what evaluation scores. Its two constructors are the only places one
is made from generated tokens: `of_answer`, one completion of a server's generate answer (one turn),
and `of_conversation`, a finished multi-turn rollout (pipeline/rollout/multi_turn.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.task.answers import completion_text
from pipeline.task.example import Example

if TYPE_CHECKING:
    from pipeline.rollout.multi_turn import Conversation


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # the server's (behaviour policy), per token
    text: str
    truncated: bool  # cut at max_completion_tokens rather than ended by EOS/stop
    example: Example  # its prompt's example: question, reference answer, the row's other columns
    engine: int = 0  # the generation engine that made it
    version: int = 0  # the weights version that made it
    loss_mask: list[int] | None = None  # per token: 1 the model wrote it, 0 a tool's result (None: all 1)
    tool_calls: tuple[tuple[str, bool], ...] = ()  # (tool name, succeeded) of each call it made
    messages: list[dict] | None = None  # a multi-turn rollout as TRL's message list (None: one turn)
    # (version, start, end): the weights version that sampled token_ids[start:end]; a weight update
    # mid-generation (train.max_staleness >= 2) makes two or more. () = all of them `version`'s.
    versions: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of_answer(cls, prompt_ids: list[int], completion: dict, example: Example, version: int) -> Completion:
        """One completion of a server's (or `Engines`') generate answer; `version`: the answer's."""
        return cls(
            prompt_ids,
            completion["token_ids"],
            completion["logprobs"],
            completion["text"],
            completion["finish_reason"] == "length",
            example,
            completion.get("engine", 0),
            completion.get("version", version),
            versions=tuple(tuple(span) for span in completion.get("versions", ())),
        )

    @classmethod
    def of_conversation(cls, conversation: Conversation, example: Example, tokenizer) -> Completion:
        """A finished multi-turn rollout: every token as the model read it (the tools' masked out), the
        calls it made, TRL's message list for the rewards, and the text with the turns as the model read them."""
        c = conversation
        return cls(
            c.prompt_ids,
            c.token_ids,
            c.logprobs,
            tokenizer.decode(c.token_ids, skip_special_tokens=False),
            c.finish_reason == "length",
            example,
            c.engine,
            c.version,
            c.loss_mask,
            tuple(c.calls),
            c.messages(),
            tuple(c.versions),
        )

    @property
    def answer(self) -> str:
        return self.example.answer

    @property
    def multi_turn(self) -> bool:
        """Generated with tools (its turns as TRL's message list), whether or not it called one."""
        return self.messages is not None

    @property
    def scored(self) -> str | list[dict]:
        """What the rewards read: TRL's message-list completion for a rollout with tools, else the text."""
        return self.text if self.messages is None else self.messages

    @property
    def final_text(self) -> str:
        """The model's final answer turn (the whole text without tools)."""
        return completion_text(self.scored)

    @property
    def newest_version(self) -> int:
        """The newest weights version that sampled any of its tokens (`version` is the oldest)."""
        return max((v for v, _, _ in self.versions), default=self.version)

    @property
    def model_tokens(self) -> int:
        """The tokens the model wrote (what the loss trains and the length normalisers count)."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass
class Generation:
    """A generate call's completions, each prompt's `n` in a group, and the answers' bookkeeping."""

    groups: list[list[Completion]]  # per prompt, in the order asked
    version: int  # the oldest weights version that generated any of them
    split: dict  # the engines that took part and their imbalance (the first turn's); {} from one server
    timing: dict[str, float]  # the server's engine seconds and phases (summed over turns)
    requests: int = 1  # generate requests made (multi-turn: one per turn, more where a turn was split)

    @property
    def completions(self) -> list[Completion]:
        """Every completion, prompt by prompt (each prompt's group contiguous)."""
        return [c for group in self.groups for c in group]
