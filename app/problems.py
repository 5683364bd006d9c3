"""Problems: one record type, loaders for local files and Hugging Face data sets, and prompt templates.

Every loader yields the same `Problem`, whatever the layout of the source, detected per record:
- MATH / MATH-500: `problem`, `solution`, `answer` (or only a `solution` whose last `\\boxed{}` is the answer),
  `level` ("Level 3" or 3), `subject` (or `type`), `unique_id`;
- GSM8K: `question`, `answer` = worked solution + "#### n" (gold = n, solution = the text before ####).
Ids are stable across runs and shuffles (an `id`/`unique_id` field, else `<source>-<row index>`), so sharded,
append-only outputs resume correctly.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from app.config import ConfigError

QUESTION_FIELDS = ("problem", "question")
ID_FIELDS = ("id", "unique_id")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


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


# ------------------------------------------------------------------------------------------------ sources


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path} line {lineno}"
            except json.JSONDecodeError as e:
                raise ProblemFormatError(f"{path} line {lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _read_json(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProblemFormatError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        key = next((k for k in ("problems", "data", "examples", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise ProblemFormatError(f"{path}: expected a list of records (or an object with a 'problems' or 'data' list)")
        data = data[key]
    if not isinstance(data, list):
        raise ProblemFormatError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield rec, f"{path} record {i}"


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    for i, rec in enumerate(pq.read_table(path).to_pylist()):
        yield rec, f"{path} row {i}"


def _pick_split(dsdict, split: str | None, where: str):
    splits = list(dsdict.keys())
    if split is not None:
        if split not in dsdict:
            raise ProblemFormatError(f"{where}: no split {split!r} (splits: {', '.join(splits)}); give one as NAME:SPLIT")
        return dsdict[split], split
    for default in ("test", "validation", "train"):
        if default in dsdict:
            return dsdict[default], default
    if len(splits) == 1:
        return dsdict[splits[0]], splits[0]
    raise ProblemFormatError(f"{where}: several splits ({', '.join(splits)}); choose one as NAME:SPLIT")


def _read_hf(source: str, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    """A data set directory saved with `save_to_disk`, a local data files directory, or a Hub name."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as e:  # the hub, a missing config, a bad split: one line with the cause
            raise ProblemFormatError(f"cannot load data set {source!r} (subset={subset}, split={split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds, split = _pick_split(ds, split, source)
    name = path.name if path.exists() else source.rstrip("/").split("/")[-1]
    if split:
        name = f"{name}-{split}"
    return ((rec, f"{source} row {i}") for i, rec in enumerate(ds)), name


def _records(source: str | Path, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    path = Path(source)
    text = str(source)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if suffix not in readers:
            raise ProblemFormatError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        return readers[suffix](path), path.stem
    if path.is_dir():
        return _read_hf(text, split, subset)
    if text.lower().endswith(LOCAL_SUFFIXES) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"problem file not found: {source}")
    name, sep, name_split = text.partition(":")  # "HuggingFaceH4/MATH-500:test" or "openai/gsm8k:main:test"
    if sep:
        parts = name_split.split(":")
        if len(parts) == 2:
            subset, name_split = parts
        split = split or name_split
    return _read_hf(name, split, subset)


def _parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ConfigError(f"shard {shard!r} must be INDEX/COUNT, e.g. 0/4")
        shard = (int(m.group(1)), int(m.group(2)))
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard {shard!r} must be (index, count) with 0 <= index < count")
    return index, count


def load_problems(
    source: str | Path,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    shard: tuple[int, int] | str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> list[Problem]:
    """Problems from a .jsonl/.json/.parquet file, a saved or local data set directory, or a Hub name.

    Hub names take an optional split and subset: `NAME:SPLIT` or `NAME:SUBSET:SPLIT` (or the keywords);
    without a split, `test` is used when there is one. The order of operations is shuffle (by
    `shuffle_seed`), then `limit` (the first N), then `shard=(index, count)` (every count-th problem from
    index), so the shards of one limited run cover it exactly, without overlap.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    shard = _parse_shard(shard)
    if str(source).startswith("toy:"):  # the toy world's generated splits: toy:train, toy:test
        from app.toy.generator import load_toy

        problems = load_toy(str(source))
    else:
        records, name = _records(source, split, subset)
        problems = [record_to_problem(rec, name, i, where) for i, (rec, where) in enumerate(records)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(problems)
    if limit is not None:
        problems = problems[:limit]
    if shard is not None:
        index, count = shard
        problems = problems[index::count]
    return problems


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
TEMPLATES = ("qwen-math", "llama-cot", "plain", "toy")


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
    if template == "toy":  # the toy policy's training format
        from app.toy.generator import toy_prompt

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
