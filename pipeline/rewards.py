"""The recipe's reward functions and answer extraction: the public place to import them from.

They follow TRL's reward convention, so they plug into `trl.GRPOTrainer(reward_funcs=[...])` as they are:

    from pipeline.rewards import REWARD_FUNCS, correctness_reward, extract_gsm8k_answer

They live in pipeline/task/ (rewards.py, answers.py, xml_format.py); this module only names them.
"""

from pipeline.task.answers import (
    answer_key,
    answers_equivalent,
    answers_match,
    completion_text,
    extract_gsm8k_answer,
)
from pipeline.task.reasoning import reasoning_steps_reward
from pipeline.task.reward_functions import (
    BUILTIN_REWARDS,
    CORRECT_POINTS,
    INT_POINTS,
    REWARD_FUNCS,
    SOFT_POINTS,
    STRICT_POINTS,
    XML_TAG_POINTS,
    XML_TAIL_PENALTY,
    Reward,
    RewardError,
    correctness_reward,
    int_answer_reward,
    load_rewards,
    score_completions,
    soft_format_reward,
    strict_format_reward,
    xml_count_reward,
    xml_count_score,
)
from pipeline.task.xml_format import TAGS, extract_xml_answer, is_soft_format, is_strict_format

__all__ = [
    "BUILTIN_REWARDS",
    "CORRECT_POINTS",
    "INT_POINTS",
    "REWARD_FUNCS",
    "SOFT_POINTS",
    "STRICT_POINTS",
    "TAGS",
    "XML_TAG_POINTS",
    "XML_TAIL_PENALTY",
    "Reward",
    "RewardError",
    "answer_key",
    "answers_equivalent",
    "answers_match",
    "completion_text",
    "correctness_reward",
    "extract_gsm8k_answer",
    "extract_xml_answer",
    "int_answer_reward",
    "is_soft_format",
    "is_strict_format",
    "load_rewards",
    "reasoning_steps_reward",
    "score_completions",
    "soft_format_reward",
    "strict_format_reward",
    "xml_count_reward",
    "xml_count_score",
]
