"""Recipes: YAML files loaded into validated pydantic configs, with `key=value` overrides.

Every error is one line that names the file and the key, so a typo in a recipe never surfaces as a traceback
from deep inside Ray. Config classes subclass `Config` (unknown keys are errors, values are type-checked).
"""
from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A recipe or override that cannot be used. The message is one line meant for the user."""


class Config(BaseModel):
    """Base of every config: unknown keys are rejected, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


C = TypeVar("C", bound=Config)

# True while a recipe is validated: a section that makes its own one-line errors on direct construction
# (PoolConfig) leaves them to the recipe's loader, which names the file and the whole key.
IN_RECIPE: ContextVar[bool] = ContextVar("in_recipe", default=False)


def resolve_recipe(recipe: str | Path) -> Path:
    """A path, or a name under configs/ with or without `.yaml` (`toy/beam_search`)."""
    p = Path(recipe)
    candidates = [p, p.with_suffix(".yaml"), CONFIG_ROOT / p, (CONFIG_ROOT / p).with_suffix(".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"recipe not found: {recipe} (give a YAML path or a name under {CONFIG_ROOT}, e.g. toy/beam_search)")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. search.n=16)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}' (check the spelling; `ponder config show` lists the valid keys)"
    if first["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    got = first.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: key '{loc}': {first['msg'].removeprefix('Value error, ')}{got_s}{more}"


def build_config(cls: type[C], data: dict, source: str = "<config>") -> C:
    token = IN_RECIPE.set(True)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_error(e, source)) from None
    finally:
        IN_RECIPE.reset(token)


def read_recipe(recipe: str | Path) -> tuple[dict, Path]:
    path = resolve_recipe(recipe)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data, path


def load_config(cls: type[C], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Load `recipe` (or the class defaults when None), apply overrides, validate."""
    if recipe is None:
        data, source = {}, "<defaults>"
    else:
        data, path = read_recipe(recipe)
        source = str(path)
    data = apply_overrides(data, overrides)
    if overrides:
        source += f" + overrides {' '.join(overrides)}"
    return build_config(cls, data, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
