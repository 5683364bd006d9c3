"""Where results may go: under `ray job submit` a relative path is the job's temporary working dir on the head node.

Ray unpacks `--working-dir` into a fresh folder per job (and per code change) and cleans it up, so a relative
`output_dir` there is invisible to the user, lost, and never resumed. On a cluster, every output path must be
shared storage every node sees: an absolute path on a shared file system, or (where the writer takes URIs, as Ray
Train's `storage_path` does) `s3://`, `gs://`, ... Recipes for real clusters carry the placeholder `<shared>`,
refused until it is replaced.
"""
from __future__ import annotations

import os
from pathlib import Path

from app.config import ConfigError

PLACEHOLDER = "<shared>"
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "file://")


def on_cluster() -> bool:
    """True under `ray job submit` (the job manager sets RAY_JOB_CONFIG_JSON_ENV_VAR for the entrypoint) or when
    RAY_ADDRESS names a cluster to connect to."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return True
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return bool(address) and address != "local"


def is_uri(path: str) -> bool:
    return str(path).startswith(URI_SCHEMES)


def check_output_path(path: str | os.PathLike, key: str, *, allow_uri: bool = False,
                      cluster: bool | None = None) -> str:
    """Return `path` if results written there survive the job; else a one-line ConfigError naming `key`.

    - a `<shared>` placeholder is always refused (the recipe must be edited or overridden first);
    - a URI is accepted where the writer takes one (`allow_uri`), refused elsewhere;
    - on a cluster (`cluster`, default `on_cluster()`), a relative path is refused.
    """
    text = str(path)
    example = f"{key}=/mnt/shared/ponder/..." + (" or s3://BUCKET/ponder/..." if allow_uri else "")
    if PLACEHOLDER in text:
        raise ConfigError(f"{key}: {text!r} still has the {PLACEHOLDER} placeholder; replace it with storage every "
                          f"node sees, e.g. {example}")
    if is_uri(text):
        if allow_uri:
            return text
        raise ConfigError(f"{key}: {text!r} is a URI, but this output is written as files; give a path on a shared "
                          f"file system (NFS, Lustre, a mounted bucket), e.g. {key}=/mnt/shared/ponder/...")
    if (on_cluster() if cluster is None else cluster) and not Path(text).expanduser().is_absolute():
        raise ConfigError(f"{key}: {text!r} is relative; under `ray job submit` it would land in the job's "
                          f"temporary working dir on the head node (lost, never resumed). Give shared storage "
                          f"every node sees, e.g. {example}")
    return text
