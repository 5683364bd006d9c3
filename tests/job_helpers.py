"""What the job tests share (search, tune): a run's records read back from its shards, and `ponder report`'s
summary of a run directory."""
from __future__ import annotations

import json
from pathlib import Path


def lines(out_dir: Path) -> list[dict]:
    """Every complete record line of every shard (duplicates included; a half-written line is no record)."""
    out = []
    for p in sorted(Path(out_dir).glob("shard-*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def summary_of(out_dir, capsys) -> dict:
    """`ponder report DIR --json`'s summary (what was printed before is dropped)."""
    from jobs import report

    capsys.readouterr()
    assert report.main([str(out_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
