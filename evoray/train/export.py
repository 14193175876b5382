"""``export``: an adapter folder as a servable model: merged into its base, or the adapter alone."""

from __future__ import annotations

import os
import shutil
import tempfile

from evoray.errors import ModelError

__all__ = ["export"]

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "evoray_adapter.json")


def export(adapter: str, out: str, *, merge: bool = True, model_spec: str | None = None,
           cache_dir: str | None = None) -> str:
    """Write ``out`` (path or URI): with ``merge``, a Hugging Face model folder (base + LoRA merged,
    with the tokenizer) that ``transformers`` or vLLM load directly; without, the adapter's peft
    files and tokenizer alone.

    Args:
        adapter: adapter folder written by :func:`evoray.train.train` (path or URI).
        model_spec: base model; None = the ``base_model`` recorded in the adapter.

    Raises:
        ModelError: no adapter there, no base model known, or a base that does not match.
    """
    from evoray.lora import load_adapter, localize, read_meta, upload_dir
    from evoray.models import load_model

    local, handle = localize(adapter)
    try:
        if not os.path.exists(os.path.join(local, "adapter_config.json")):
            raise ModelError(f"adapter {adapter!r}: no adapter_config.json there")
        spec = model_spec or read_meta(local).get("base_model")
        if not spec:
            raise ModelError(f"adapter {adapter!r} does not record its base model; pass --model")
        with tempfile.TemporaryDirectory(prefix="evoray-export-") as tmp:
            model, tok = load_model(spec, cache_dir=cache_dir)
            if merge:
                merged = load_adapter(model, local, trainable=False).merge_and_unload()
                merged.save_pretrained(tmp)
            else:
                for name in _ADAPTER_FILES:
                    if os.path.exists(os.path.join(local, name)):
                        shutil.copy(os.path.join(local, name), tmp)
            tok.save_pretrained(tmp)
            upload_dir(tmp, out)
    finally:
        if handle is not None:
            handle.cleanup()
    return out
