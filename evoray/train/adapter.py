"""LoRA adapters on disk: peft's files plus ``evoray_adapter.json``, which records the base model.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's
``save_pretrained``), the tokenizer files, ``evoray_adapter.json`` (``base_model``: the model spec
it was trained on, and ``fingerprint``: the base's architecture, layer count, widths and
vocabulary size) and, after training, ``adam_state.safetensors`` (see :mod:`evoray.train.loop`).
Loading an adapter onto a base whose fingerprint differs is an error rather than a shape
mismatch deep inside peft.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from evoray.data.io import resolve
from evoray.errors import ModelError, TrainError

__all__ = ["META_FILE", "check_adapter", "fingerprint", "read_meta", "write_meta", "load_adapter",
           "fresh_adapter", "localize", "upload_dir"]

META_FILE = "evoray_adapter.json"
_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer", "vocab_size",
         "intermediate_size", "num_attention_heads", "num_key_value_heads")


def fingerprint(model) -> dict:
    """The base model's architecture facts that an adapter depends on."""
    cfg = model.config.to_dict()
    return {k: cfg[k] for k in _KEYS if k in cfg}


def localize(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local folder for ``path``: itself, or a temporary download of a URI (keep the handle)."""
    if "://" not in path:
        return os.path.expanduser(path), None
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        raise ModelError(f"adapter {path!r}: no such folder")
    tmp = tempfile.TemporaryDirectory(prefix="evoray-adapter-")
    pafs.copy_files(p, tmp.name, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return tmp.name, tmp


def upload_dir(local: str, dest: str) -> None:
    """Copy folder ``local`` to ``dest`` (path or URI), replacing files of the same name."""
    if "://" not in dest:
        os.makedirs(dest, exist_ok=True)
        shutil.copytree(local, dest, dirs_exist_ok=True)
        return
    import pyarrow.fs as pafs

    fs, p = resolve(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_meta(folder: str, base_model: str, model) -> None:
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"base_model": base_model, "fingerprint": fingerprint(model)}, f, indent=1)


def check_adapter(model, folder: str, *, name: str | None = None,
                  spec: str | None = None) -> None:
    """Raise ModelError unless the local ``folder`` holds a LoRA adapter trained on a base with
    ``model``'s architecture (``name``: the adapter as the user gave it; ``spec``: the base's
    name, for the message). ``model`` may live on the meta device."""
    name = name or folder
    if not os.path.exists(os.path.join(folder, "adapter_config.json")):
        raise ModelError(f"adapter {name!r}: no adapter_config.json there (not a LoRA adapter "
                         f"folder)")
    meta = read_meta(folder)
    if meta.get("fingerprint") and meta["fingerprint"] != fingerprint(model):
        base = f"{spec!r}" if spec else f"this base ({fingerprint(model)})"
        raise ModelError(f"adapter {name!r} was trained on base model "
                         f"{meta.get('base_model')!r} ({meta['fingerprint']}), not on {base}")


def load_adapter(model, adapter: str, *, trainable: bool):
    """Wrap ``model`` with the adapter in the local folder ``adapter``.

    Raises:
        ModelError: the folder has no adapter, or it was trained on a different base model.
    """
    from peft import PeftModel

    check_adapter(model, adapter)
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"adapter {adapter!r} could not be loaded onto this base model: "
                         f"{str(e).splitlines()[0]}") from None


def load_with_adapter(model_spec: str, adapter: str | None, *, cache_dir: str | None = None):
    """``(model, tokenizer)``: the base ``model_spec`` wrapped with the adapter folder
    ``adapter`` (path or URI; frozen), or the base alone when ``adapter`` is None.

    Raises:
        ModelError: the adapter is missing or was trained on another base model.
    """
    from evoray.models import load_model

    model, tok = load_model(model_spec, cache_dir=cache_dir)
    if adapter:
        local, handle = localize(adapter)
        try:
            model = load_adapter(model, local, trainable=False)
        finally:
            if handle is not None:
                handle.cleanup()
    return model, tok


def fresh_adapter(model, cfg, seed: int):
    """A new trainable LoRA (``cfg``: a TrainConfig) with ``A`` drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model

    from evoray.features.grads import lora_config

    base = lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha,
                       target_modules=cfg.target_modules)
    config = LoraConfig(r=base.r, lora_alpha=base.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=base.target_modules, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=base.fan_in_fan_out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def check_adapter_path(adapter: str) -> None:
    """Fail early (on the driver) when ``adapter`` is not an adapter folder."""
    local, tmp = localize(adapter)
    try:
        if not os.path.exists(os.path.join(local, "adapter_config.json")):
            raise TrainError(f"adapter {adapter!r}: not found or has no adapter_config.json")
    finally:
        if tmp is not None:
            tmp.cleanup()
