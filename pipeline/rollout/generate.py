"""Generation, single- or multi-turn, behind one function: training's rollouts (pipeline/trainer/rollout.py),
evaluation (pipeline/rollout/evaluate.py) and the benchmark's runs all generate through `generate`, and
all get `Completion`s back.

`engines` is an `Engines` (pipeline/generation/engines.py: the step's prompts spread over the engines)
or one server's `ServerClient`: both answer `generate` alike. Without tools a call is one generate
request, exactly as asked; with tools (`ToolRollouts`) it is `generate_with_tools`'s turns.
"""

from __future__ import annotations

from pipeline.rollout.completion import Completion, Generation
from pipeline.rollout.multi_turn import ToolRollouts, generate_with_tools
from pipeline.task.example import Example


def generate(
    engines,
    prompt_ids: list[list[int]],
    examples: list[Example],
    *,
    n: int,
    max_tokens: int,
    seed: int | None = None,
    tools: ToolRollouts | None = None,
    **params,
) -> Generation:
    """`n` completions of each prompt (`examples[i]` is prompt i's), sampled with `params` (temperature,
    top_p); with `tools`, multi-turn rollouts that call them. Prompt i is sampled with seed `seed + i`."""
    if tools is None:
        answer = engines.generate(prompt_ids, n=n, max_tokens=max_tokens, seed=seed, **params)
        groups = [
            [Completion.of_answer(ids, c, example, answer["version"]) for c in result["completions"]]
            for ids, example, result in zip(prompt_ids, examples, answer["results"], strict=True)
        ]
        return Generation(groups, answer["version"], answer.get("split", {}), answer.get("timing", {}))
    conversations, info = generate_with_tools(
        engines,
        prompt_ids,
        n=n,
        max_tokens=max_tokens,
        seed=seed,
        params=params,
        toolbox=tools.toolbox,
        tokenizer=tools.tokenizer,
        turns=tools.turns,
        max_iterations=tools.max_iterations,
        timeout_s=tools.timeout_s,
        max_prompts=tools.max_prompts,
    )
    groups = [
        [Completion.of_conversation(c, example, tools.tokenizer) for c in group]
        for example, group in zip(examples, conversations, strict=True)
    ]
    return Generation(groups, info["version"], info["split"], info["timing"], info["requests"])
