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
                      cluster: bool | None = None, writable: bool = False, kind: str = "dir") -> str:
    """Return `path` if results written there survive the job; else a one-line ConfigError naming `key`.

    - an empty path is refused (it would write into the current directory);
    - a `<shared>` placeholder is always refused (the recipe must be edited or overridden first);
    - a URI is accepted where the writer takes one (`allow_uri`), refused elsewhere;
    - on a cluster (`cluster`, default `on_cluster()`), a relative path is refused;
    - `writable` (the job is about to write there): a local path must be a `kind` ("dir" or "file") or not exist
      yet, must not lie under a file, and its nearest existing folder must take a file (`check_writable`).
    """
    text = str(path) if path is not None else ""
    if not text.strip():
        raise ConfigError(f"{key} is empty: it would write into the current directory; give a path, e.g. "
                          f"{key}=results/NAME")
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
    if writable:
        check_writable(text, key, kind)
    return text


def check_writable(path: str | os.PathLike, key: str, kind: str = "dir") -> None:
    """One line naming `key` unless a job can create or write the `kind` ("dir" or "file") at local `path`: not a
    file where a folder is wanted (or the reverse), not under a file, and its nearest existing folder takes a file
    (probed with a temporary file, removed at once: `os.access` says yes to root on read-only mounts)."""
    import tempfile

    p = Path(path).expanduser()
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is a file, not a directory; give a directory (new or a run's own)")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is a directory; give a file path, e.g. {key}={p / 'out.jsonl'}")
    folder = p if p.is_dir() else p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} lies under {str(folder)!r}, which is a file; give a path whose "
                          "parents are directories")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ponder-write-probe-", dir=folder)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write under {str(folder)!r} ({e.strerror or e}); give a writable path") from None
    os.close(fd)
    os.unlink(probe)
