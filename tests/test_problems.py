"""Problem loaders on small files made here (no hub access), shuffling and sharding, prompt templates."""
from __future__ import annotations

import json

import pytest

from app.config import ConfigError
from app.datasets import load_problems
from app.problems import (
    LLAMA_COT_SYSTEM_PROMPT,
    QWEN_MATH_SYSTEM_PROMPT,
    Problem,
    ProblemFormatError,
    build_prompt,
)

MATH_ROWS = [
    {
        "problem": f"What is ${i}+\\frac{{1}}{{2}}$?",
        "solution": f"Add them: $\\boxed{{{i}.5}}$.",
        "answer": f"{i}.5",
        "subject": "Algebra",
        "level": (i % 5) + 1,
        "unique_id": f"test/algebra/{i}.json",
    }
    for i in range(10)
]
GSM8K_ROWS = [
    {"question": "Tom has 1,000 apples and buys 234 more. How many now?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
    {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_math500_layout(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "math500.jsonl", MATH_ROWS))
    assert len(problems) == 10
    p = problems[3]
    assert p == Problem(
        id="test/algebra/3.json",
        question="What is $3+\\frac{1}{2}$?",
        answer="3.5",
        solution="Add them: $\\boxed{3.5}$.",
        level=4,
        subject="Algebra",
    )


def test_jsonl_gsm8k_layout_and_row_ids(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS))
    assert [p.answer for p in problems] == ["1234", "5"]
    assert problems[0].solution == "1000 + 234 = <<1000+234=1234>>1234"
    assert problems[0].question.startswith("Tom has")
    assert [p.id for p in problems] == ["gsm8k_test-0", "gsm8k_test-1"]


def test_layout_is_detected_per_record_and_math_answer_from_box(tmp_path):
    rows = [GSM8K_ROWS[1], {"problem": "2+2?", "solution": "It is $\\boxed{4}$.", "level": "Level 2", "type": "Prealgebra"}]
    a, b = load_problems(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert (a.answer, b.answer, b.level, b.subject) == ("5", "4", 2, "Prealgebra")


def test_json_list_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(MATH_ROWS[:2]))
    assert [p.answer for p in load_problems(path)] == ["0.5", "1.5"]


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), path)
    problems = load_problems(path, limit=4)
    assert [p.id for p in problems] == [r["unique_id"] for r in MATH_ROWS[:4]]
    assert problems[0].level == 1


def test_saved_hf_dataset_and_data_files_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(GSM8K_ROWS).save_to_disk(str(saved))
    problems = load_problems(saved)
    assert [p.answer for p in problems] == ["1234", "5"]
    assert problems[1].id == "saved-1"

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MATH_ROWS[:3]), "test": datasets.Dataset.from_list(MATH_ROWS[3:5])}).save_to_disk(str(dd))
    assert [p.answer for p in load_problems(dd)] == ["3.5", "4.5"]  # test split by default
    assert len(load_problems(dd, split="train")) == 3
    with pytest.raises(ProblemFormatError, match="no split 'dev'"):
        load_problems(dd, split="dev")

    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "test.jsonl", MATH_ROWS[:6])
    assert len(load_problems(files, split="test")) == 6


def test_limit_shuffle_and_shards(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    ids = [p.id for p in load_problems(path)]
    a = [p.id for p in load_problems(path, shuffle_seed=7)]
    b = [p.id for p in load_problems(path, shuffle_seed=7)]
    c = [p.id for p in load_problems(path, shuffle_seed=8)]
    assert a == b and sorted(a) == sorted(ids) and a != ids and a != c
    assert [p.id for p in load_problems(path, limit=3)] == ids[:3]
    assert load_problems(path, limit=0) == []

    limited = [p.id for p in load_problems(path, shuffle_seed=7, limit=7)]
    shards = [[p.id for p in load_problems(path, shuffle_seed=7, limit=7, shard=(i, 3))] for i in range(3)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(limited) and len(set(flat)) == len(flat)
    assert [p.id for p in load_problems(path, shard="1/3")] == [p.id for p in load_problems(path, shard=(1, 3))]
    for bad in [(3, 3), (-1, 2), "x"]:
        with pytest.raises(ConfigError, match="shard"):
            load_problems(path, shard=bad)


def test_malformed_record_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [MATH_ROWS[0], {"prompt": "2+2?", "answer": "4"}])
    with pytest.raises(ProblemFormatError) as e:
        load_problems(path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "'problem' or 'question'" in msg and "prompt" in msg
    assert "\n" not in msg and isinstance(e.value, ValueError)

    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"question": "2+2?"}])
    with pytest.raises(ProblemFormatError, match=r"noanswer.jsonl line 1: .*'answer'"):
        load_problems(path)

    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "1?", "answer": "1"}\n{"question": \n')
    with pytest.raises(ProblemFormatError, match="broken.jsonl line 2: not valid JSON"):
        load_problems(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------------ prompts

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|end|>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def test_plain_prompt():
    p = Problem(id="x", question="What is 2+2?", answer="4")
    assert build_prompt(p, template="plain") == "What is 2+2?\n\n"
    assert build_prompt("Q?", template="plain", system_prompt="Be brief.") == "Be brief.\n\nQ?\n\n"


def test_chat_prompts_use_the_recipe_system_prompts(chat_tokenizer):
    p = Problem(id="x", question="What is 2+2?", answer="4")
    qwen = build_prompt(p, chat_tokenizer)  # qwen-math is the default
    assert qwen == f"<|system|>\n{QWEN_MATH_SYSTEM_PROMPT}<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    llama = build_prompt(p, chat_tokenizer, template="llama-cot")
    assert llama.startswith(f"<|system|>\n{LLAMA_COT_SYSTEM_PROMPT}<|end|>")
    assert "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct." in llama
    custom = build_prompt(p, chat_tokenizer, template="llama-cot", system_prompt="Think.")
    assert custom.startswith("<|system|>\nThink.<|end|>")
    assert build_prompt(p, chat_tokenizer, system_prompt="").startswith("<|user|>\n")


def test_prompt_errors(chat_tokenizer):
    p = Problem(id="x", question="Q", answer="1")
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_prompt(p, None, template="qwen-math")
    with pytest.raises(ConfigError, match="unknown prompt template 'alpaca'"):
        build_prompt(p, chat_tokenizer, template="alpaca")


def test_duplicate_ids_are_refused_naming_file_id_and_both_records(tmp_path):
    rows = [dict(MATH_ROWS[0]), dict(MATH_ROWS[1]), dict(MATH_ROWS[2], unique_id=MATH_ROWS[0]["unique_id"])]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ProblemFormatError) as e:
        load_problems(path)
    msg = str(e.value)
    assert str(path) in msg and repr(MATH_ROWS[0]["unique_id"]) in msg and "line 1" in msg and "line 3" in msg
    assert "\n" not in msg

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dup.parquet")
    with pytest.raises(ProblemFormatError, match=r"dup\.parquet.*row 0.*row 2"):
        load_problems(tmp_path / "dup.parquet")


def test_empty_file_is_an_error(tmp_path):
    for name, text in [("empty.jsonl", "\n\n"), ("empty.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ProblemFormatError, match=f"{name}.*no problems"):
            load_problems(tmp_path / name)


# ------------------------------------------------------------------------------------------------ URIs and shards


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_folder_and_file_uris_read_the_same_problems(tmp_path):
    shards = tmp_path / "shards"
    write_parquet(shards / "part-0.parquet", MATH_ROWS[:4])
    write_parquet(shards / "part-1.parquet", MATH_ROWS[4:])
    (shards / "_SUCCESS").write_text("")  # a writer's marker file is not a shard
    ids = [r["unique_id"] for r in MATH_ROWS]
    assert [p.id for p in load_problems(shards)] == ids
    assert [p.id for p in load_problems(shards.as_uri())] == ids  # file:///.../shards
    assert [p.id for p in load_problems((shards / "part-1.parquet").as_uri())] == ids[4:]
    jsonl_uri = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS).as_uri()
    assert [p.answer for p in load_problems(jsonl_uri, limit=2)] == ["0.5", "1.5"]
    # rows without ids are numbered over the whole folder, the same through a path and a URI
    write_parquet(tmp_path / "anon" / "a.parquet", GSM8K_ROWS)
    write_parquet(tmp_path / "anon" / "b.parquet", GSM8K_ROWS[:1])
    assert [p.id for p in load_problems((tmp_path / "anon").as_uri())] == [f"anon-train-{i}" for i in range(3)]


def test_shards_named_for_splits_read_one_split(tmp_path):
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", MATH_ROWS[:3])
    write_parquet(hub / "data" / "train-00000-of-00001.parquet", MATH_ROWS[3:])
    assert len(load_problems(hub)) == 3  # test by default, as for Hub names
    assert len(load_problems(hub.as_uri(), split="train")) == 7
    with pytest.raises(ProblemFormatError, match="no files for split 'dev'"):
        load_problems(hub.as_uri(), split="dev")


def test_uri_errors_name_the_shard_row_and_key_in_one_line(tmp_path):
    write_parquet(tmp_path / "s" / "part-0.parquet", MATH_ROWS[:2])
    write_parquet(tmp_path / "s" / "part-1.parquet", [{"prompt": "2+2?", "answer": "4"}])
    with pytest.raises(ProblemFormatError, match=r"file://.*s/part-1\.parquet row 0: record has no 'problem'"):
        load_problems((tmp_path / "s").as_uri())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1?", "answer": "1"}\n{"question": \n')
    with pytest.raises(ProblemFormatError, match=r"file://.*broken\.jsonl line 2: not valid JSON"):
        load_problems(broken.as_uri())
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_problems((tmp_path / "nope.parquet").as_uri())
    with pytest.raises(ProblemFormatError, match=r"cannot open nosuch://x/y: .*Unrecognized filesystem") as e:
        load_problems("nosuch://x/y")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ProblemFormatError, match="no .jsonl, .json or .parquet files"):
        load_problems((tmp_path / "empty").as_uri())
