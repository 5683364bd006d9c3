"""Problems: one record type, the mapping of a raw record onto it, and the prompt templates.

`app.datasets.load_problems` reads files, data sets and the toy splits into the same `Problem`, whatever the layout
of the source, detected per record here:
- MATH / MATH-500: `problem`, `solution`, `answer` (or only a `solution` whose last `\\boxed{}` is the answer),
  `level` ("Level 3" or 3), `subject` (or `type`), `unique_id`;
- GSM8K: `question`, `answer` = worked solution + "#### n" (gold = n, solution = the text before ####).
Ids are stable across runs and shuffles (an `id`/`unique_id` field, else `<source>-<row index>`), so sharded,
append-only outputs resume correctly.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from app.config import ConfigError

QUESTION_FIELDS = ("problem", "question")
ID_FIELDS = ("id", "unique_id")


class ProblemFormatError(ConfigError):
    """A record or source that cannot be read as problems. One line: the file, the record, the field, the fix."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # gold, a bare answer such as \frac{14}{3}
    solution: str | None = None
    level: int | str | None = None  # MATH level 1-5 (or the source's difficulty)
    subject: str | None = None
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ records


def _level(value: Any) -> int | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), re.IGNORECASE)
    return int(m.group(1)) if m else str(value)


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def record_to_problem(record: dict, source: str, index: int, where: str) -> Problem:
    """Map one raw record to a Problem. `where` ("file.jsonl line 3") goes into every error message."""
    if not isinstance(record, dict):
        raise ProblemFormatError(f"{where}: expected a JSON object with a 'problem' or 'question' field, got {type(record).__name__}")
    qkey = next((k for k in QUESTION_FIELDS if record.get(k) not in (None, "")), None)
    if qkey is None:
        fields = ", ".join(sorted(record)) or "none"
        raise ProblemFormatError(
            f"{where}: record has no 'problem' or 'question' field (its fields: {fields}); "
            "rename the question field to 'problem' or 'question'"
        )
    solution = record.get("solution")
    raw_answer = record.get("answer")
    if raw_answer is None or raw_answer == "":
        from app.grading import last_boxed

        answer = last_boxed(solution) if isinstance(solution, str) else None
        if answer is None:
            raise ProblemFormatError(
                f"{where}: record has no 'answer' field (and no 'solution' ending in \\boxed{{...}}); "
                "add the gold answer as 'answer'"
            )
    elif isinstance(raw_answer, str) and "####" in raw_answer:  # GSM8K: worked solution, then "#### n"
        before, _, after = raw_answer.rpartition("####")
        answer = after.strip()
        if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
            answer = answer.replace(",", "")
        solution = solution or before.strip() or None
        if not answer:
            raise ProblemFormatError(f"{where}: field 'answer' has nothing after '####'; put the final number there")
    else:
        answer = _answer_text(raw_answer)
    rid = next((record[k] for k in ID_FIELDS if record.get(k) not in (None, "")), None)
    tags = record.get("tags") or []
    return Problem(
        id=str(rid) if rid is not None else f"{source}-{index}",
        question=str(record[qkey]),
        answer=answer,
        solution=solution,
        level=_level(record.get("level", record.get("difficulty"))),
        subject=record.get("subject") or record.get("type") or None,
        tags=[str(t) for t in tags] if isinstance(tags, (list, tuple)) else [str(tags)],
    )


# ------------------------------------------------------------------------------------------------ prompts

# search-and-learn's system prompt for Llama-3.2-Instruct (recipes/*.yaml, `system_prompt`).
LLAMA_COT_SYSTEM_PROMPT = (
    "Solve the following math problem efficiently and clearly:\n\n"
    "- For simple problems (2 steps or fewer):\nProvide a concise solution with minimal explanation.\n\n"
    "- For complex problems (3 steps or more):\nUse this step-by-step format:\n\n"
    "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
    "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n"
    "...\n\n"
    "Regardless of the approach, always conclude with:\n\n"
    "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
    "Where [answer] is just the final number or expression that solves the problem."
)
# Qwen2.5-Math's chat prompt (also the Qwen2.5-Math-PRM's system turn).
QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

SYSTEM_PROMPTS = {"qwen-math": QWEN_MATH_SYSTEM_PROMPT, "llama-cot": LLAMA_COT_SYSTEM_PROMPT}
Template = Literal["qwen-math", "llama-cot", "plain", "toy"]
TEMPLATES: tuple[str, ...] = get_args(Template)
CHAT_TEMPLATES = tuple(SYSTEM_PROMPTS)  # the templates that need the tokenizer's chat template


def toy_prompt(problem: Problem | str) -> str:
    """The toy policy's training format (`template: toy`): "Question: ...\\n\\nAnswer:\\n\\n"."""
    question = problem if isinstance(problem, str) else problem.question
    return f"Question: {question}\n\nAnswer:\n\n"


def build_prompt(
    problem: Problem | str,
    tokenizer: Any = None,
    template: str = "qwen-math",
    system_prompt: str | None = None,
) -> str:
    """The text a policy is prompted with.

    `qwen-math` / `llama-cot`: the tokenizer's chat template over a system turn (the recipe's prompt, or
    `system_prompt`; "" leaves the system turn out) and the question, with the generation prompt appended.
    `plain`: no chat template, the question followed by a blank line (a step boundary), with
    `system_prompt` and a blank line before it when given. The tokenizer is passed in so that this module
    never imports transformers.
    """
    question = problem.question if isinstance(problem, Problem) else str(problem)
    if template == "toy":
        return toy_prompt(problem)
    if template == "plain":
        return (f"{system_prompt}\n\n" if system_prompt else "") + question + "\n\n"
    if template not in SYSTEM_PROMPTS:
        raise ConfigError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"prompt template {template!r} needs a tokenizer with a chat template; pass the model's tokenizer "
            "or use template 'plain'"
        )
    system = SYSTEM_PROMPTS[template] if system_prompt is None else system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
