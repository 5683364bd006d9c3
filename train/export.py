"""A finished run's model, out of its Ray Train checkpoint: the `hf/` folder rank 0 exported (`train.loop`), found
through the checkpoint's own filesystem (local or s3/gs), copied out, and written compact (bf16 weights, a float32
config) where a recipe's `output` says."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from app.config import ConfigError


def exported_model(result) -> Path | str:
    """The `hf/` folder inside a fit result's checkpoint: a local Path for local storage, else its URI.

    Read through the checkpoint's own filesystem (`Checkpoint.filesystem`): on `s3://` storage
    `result.checkpoint.path` is a key inside the bucket, not a local path."""
    import pyarrow.fs

    if result.checkpoint is None:
        raise ConfigError("training produced no checkpoint")
    ckpt = result.checkpoint
    info = ckpt.filesystem.get_file_info(f"{ckpt.path}/hf/config.json")
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"no exported model in checkpoint {ckpt.path}")
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(ckpt.path) / "hf"
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(ckpt.filesystem.type_name)
    return f"{scheme}://{ckpt.path}/hf" if scheme else f"{ckpt.path}/hf"  # else: a path on that filesystem


def download_export(checkpoint, dst: str | Path) -> Path:
    """Copy the checkpoint's `hf/` folder (only that: not the DeepSpeed shards) to the local folder `dst`,
    through the checkpoint's filesystem (local, s3, gs, ...)."""
    import pyarrow.fs

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(f"{checkpoint.path}/hf", str(dst), source_filesystem=checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    if not (dst / "config.json").exists():
        raise FileNotFoundError(f"no exported model in checkpoint {checkpoint.path}")
    return dst


def save_compact(src: str | Path, dst: str | Path, dtype: str = "bfloat16", overwrite: bool = True,
                 model_class=None) -> Path:
    """Copy an exported model to `dst` with weights stored as `dtype` (small files), config saying float32.

    `from_pretrained` then loads it in float32 (the config's dtype), so inference is exactly as trained up to
    the rounding of the weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from actors.engines.base import load_tokenizer

    src, dst = Path(src), Path(dst)
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists (pass overwrite to replace it)")
        shutil.rmtree(dst)
    cls = model_class or AutoModelForCausalLM
    model = cls.from_pretrained(src, dtype=torch.float32)
    model.to(getattr(torch, dtype))
    model.config.dtype = "float32"
    model.save_pretrained(dst, safe_serialization=True)
    cfg_path = dst / "config.json"
    data = json.loads(cfg_path.read_text())
    data["dtype"] = "float32"
    data.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    load_tokenizer(str(src)).save_pretrained(dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def export_to(checkpoint, output: str | Path, dtype: str = "bfloat16", model_class=None) -> Path:
    """The checkpoint's exported model written compact to the local folder `output` (URI storage included)."""
    with tempfile.TemporaryDirectory(prefix="ponder-export-") as tmp:
        src = download_export(checkpoint, Path(tmp) / "hf")
        return save_compact(src, output, dtype=dtype, model_class=model_class)
