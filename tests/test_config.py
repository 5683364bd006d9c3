"""Recipe loading: validated configs, overrides, one-line errors naming the file and the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from app.config import Config, ConfigError, dump_config, load_config, resolve_recipe


class Inner(Config):
    n: int = 4
    temperature: float = Field(0.8, ge=0.0)


class Outer(Config):
    job: str = "search"
    name: str = "x"
    inner: Inner = Inner()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_values(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "name: y\ninner:\n  n: 16\n"))
    assert cfg.name == "y" and cfg.inner.n == 16 and cfg.inner.temperature == 0.8


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "inner:\n  n: 16\n"), ["inner.n=32", "inner.temperature=0.5", "name=z"])
    assert cfg.inner.n == 32 and cfg.inner.temperature == 0.5 and cfg.name == "z"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  nn: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "inner.nn" in msg and str(p) in msg and "unknown key" in msg and "\n" not in msg


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, write(tmp_path, "inner:\n  n: many\n"))
    assert "inner.n" in str(e.value) and "'many'" in str(e.value)


def test_constraint_violation(tmp_path):
    with pytest.raises(ConfigError, match="inner.temperature"):
        load_config(Outer, write(tmp_path, "{}\n"), ["inner.temperature=-1"])


def test_missing_file_and_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: nope.yaml"):
        load_config(Outer, "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "inner: [\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, write(tmp_path, "{}\n"), ["inner.n"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))


def test_dump_roundtrip(tmp_path):
    cfg = load_config(Outer, None, ["inner.n=8"])
    again = load_config(Outer, write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_recipe_names_resolve_under_configs():
    assert resolve_recipe("toy/beam_search").name == "beam_search.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_config_show_prints_resolved_recipe():
    r = run_cli("config", "show", "toy/beam_search", "search.n=8")
    assert r.returncode == 0, r.stderr
    assert "job: search" in r.stdout and "n: 8" in r.stdout


def test_cli_config_show_bad_key_is_one_line(tmp_path):
    p = write(tmp_path, "job: search\nnot_a_key: 1\n")
    r = run_cli("config", "show", str(p))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "not_a_key" in lines[0] and str(p) in lines[0]


def test_cli_unknown_command():
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
