"""Training data through Ray Data (train.ingest): SFT and DPO from a folder of Parquet shards and from a file:// URI,
2 workers, each rank given only the rows of its own micro batches, and the same per-step losses as the in-memory
path on the same JSONL data; a bad record fails before Ray Train starts, naming the file and the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import ConfigError
from train.loop import TrainConfig

PICKLED_WITH = ()


def _write(records, tmp: Path, name: str) -> tuple[str, str]:
    """The records as one JSONL file and as a folder of two Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    folder = tmp / f"{name}-parquet"
    folder.mkdir()
    table = pa.Table.from_pylist(records)
    half = len(records) // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")
    return str(jsonl), str(folder)


def _run(tmp: Path, name: str, **kw) -> TrainConfig:
    kw.setdefault("lr", 3e-3)
    return TrainConfig(num_workers=2, zero_stage=2, warmup_steps=2, name=name,
                       storage_path=str(tmp / "ray"), progress=False, **kw)


def _losses(result) -> list[float]:
    rows = (Path(result.checkpoint.path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


class _SeenRows:
    """Mixin: each rank writes the rows its examples hold (a dict under Ray Data ingest) into `seen_dir`."""

    def __init__(self, *args, seen_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_dir = seen_dir

    def prepare(self, engine, examples, tokenizer, rank, world):
        super().prepare(engine, examples, tokenizer, rank, world)
        rows = sorted(examples) if isinstance(examples, dict) else list(range(len(examples)))
        Path(self.seen_dir, f"rank{rank}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def sft_records():
    from app.toy.world import sft_examples

    return sft_examples(24, levels=[1, 2, 3], seed=3)


def test_sft_from_parquet_shards_matches_the_jsonl_path(ray_cluster, tmp_path, sft_records,
                                                                  pickled_by_value):
    from train.loop import fit
    from train.sft import SFTConfig, SFTTask, check

    class SeenSFT(_SeenRows, SFTTask):
        pass

    jsonl, folder = _write(sft_records, tmp_path, "sft")
    losses, seen = {}, {}
    for label, data, ingest in [("memory", jsonl, "memory"), ("parquet", folder, "ray_data")]:
        cfg = SFTConfig(model="new:toy-tiny", data=data,
                        train=_run(tmp_path, f"sft-{label}", micro_batch_size=6, epochs=2, ingest=ingest))
        check(cfg)
        d = tmp_path / f"seen-{label}"
        d.mkdir()
        result = fit(SeenSFT(cfg, seen_dir=str(d)), cfg.train)
        assert result.error is None, result.error
        losses[label] = _losses(result)
        seen[label] = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = len(sft_records)
    assert len(losses["memory"]) == 2 * (n // 12)  # 2 epochs of 72 examples in steps of 2 x 6
    assert losses["parquet"] == pytest.approx(losses["memory"], rel=1e-5, abs=1e-6)
    assert seen["memory"] == [list(range(n))] * 2  # in memory every rank holds every example
    r0, r1 = map(set, seen["parquet"])
    assert r0 and r1 and len(r0) < n and len(r1) < n, (len(r0), len(r1))  # each rank only its rows ...
    assert r0 | r1 == set(range(n))  # ... and together all of them (2 epochs deal every row somewhere)


def test_dpo_from_parquet_matches_the_jsonl_path_and_each_rank_holds_its_half(ray_cluster, tmp_path,
                                                                              pickled_by_value):
    from app.toy.world import toy_problems
    from train.dpo import DPOConfig, DPOTask, check
    from train.loop import fit

    class SeenDPO(_SeenRows, DPOTask):
        pass

    pairs = []
    for p in toy_problems("train", n_per_level=20, levels=[2, 3], seed=4):
        wrong = p.solution.replace(str(p.answer), str(int(p.answer) + 1))
        pairs.append({"prompt": f"Q: {p.question}\nA: ", "chosen": p.solution, "rejected": wrong, "kind": "outcome"})
    jsonl, folder = _write(pairs, tmp_path, "pairs")
    losses, seen = {}, {}
    for label, data, ingest in [("memory", jsonl, "memory"), ("parquet", f"file://{folder}", "ray_data")]:
        cfg = DPOConfig(model="toy:policy", data=data, beta=0.5,
                        train=_run(tmp_path, f"dpo-{label}", micro_batch_size=4, epochs=1, lr=1e-4, ingest=ingest))
        check(cfg)
        d = tmp_path / f"seen-{label}"
        d.mkdir()
        result = fit(SeenDPO(cfg, seen_dir=str(d)), cfg.train)
        assert result.error is None, result.error
        losses[label] = _losses(result)
        seen[label] = [set(json.loads((d / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert len(losses["memory"]) == 40 // 8
    # the reference log-probs are computed in other batches (each rank its own rows): float noise only
    assert losses["parquet"] == pytest.approx(losses["memory"], rel=1e-4, abs=1e-5)
    r0, r1 = seen["parquet"]
    assert len(r0) == len(r1) == 20 and not r0 & r1  # one epoch: disjoint halves


def test_a_bad_record_fails_before_ray_train_starts(ray_cluster, tmp_path, sft_records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.sft import SFTConfig, check, train

    bad = [dict(r) for r in sft_records[:8]]
    del bad[5]["completion"]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    cfg = SFTConfig(model="new:toy-tiny", data=str(tmp_path / "bad.jsonl"), train=_run(tmp_path, "bad"))
    with pytest.raises(ConfigError, match=r"bad.jsonl line 6: no key 'completion'"):
        train(cfg)  # a local JSONL file: checked whole by `check`, with line numbers, before Ray is touched
    folder = tmp_path / "bad-parquet"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "prompt"} for r in bad]),
                   folder / "part-0.parquet")
    cfg = SFTConfig(model="new:toy-tiny", data=str(folder), train=_run(tmp_path, "bad-pq"))
    with pytest.raises(ConfigError, match=r"part-0.parquet record .*: no key 'prompt'") as e:
        train(cfg)  # checked as Ray Data reads it, before Ray Train starts
    assert "Traceback" not in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "ray" / "bad-pq").exists()
    with pytest.raises(ConfigError, match="train.ingest: memory reads a local JSONL file"):
        check(SFTConfig(model="new:toy-tiny", data=str(folder), train=_run(tmp_path, "m", ingest="memory")))
