"""LoRA in evoray: the adapter's peft config, adapter folders on disk, and the Adam-state format.

**Config.** :func:`lora_config` and :func:`attach_lora` build the peft LoRA that the features stage
differentiates (a fresh one, ``B = 0``, ``A`` from a seed, or a saved adapter) and that training
starts from (:func:`fresh_adapter`). :func:`lora_pairs` lists the adapted linears in module
order, the order in which gradients are flattened and Adam moments stored.

**Adapter folders.** An adapter folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (peft's ``save_pretrained``), the tokenizer files,
``evoray_adapter.json`` (``base_model``: the model spec it was trained on, and ``fingerprint``: the
base's architecture, layer count, widths and vocabulary size) and, after training,
``adam_state.safetensors``. Loading an adapter onto a base whose fingerprint differs is an error
rather than a shape mismatch deep inside peft.

**Adam state.** ``adam_state.safetensors`` holds the LoRA matrices' Adam moments,
``<module>.lora_A.exp_avg`` / ``.exp_avg_sq`` and the same for ``lora_B``, written by the training
loop (:func:`save_adam_state`) and read by the features stage for LESS-style Adam features
(:func:`load_adam_state`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch

from evoray.errors import FeatureError, ModelError, TrainError
from evoray.storage import resolve

# transformers 5 deprecates an attribute that peft 0.21 still reads when it wraps a model: the
# warning is about those two libraries, not the user's code.
warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)

__all__ = ["META_FILE", "LoraPair", "lora_pairs", "lora_config", "attach_lora", "check_adapter",
           "fingerprint", "read_meta", "write_meta", "load_adapter", "load_with_adapter",
           "fresh_adapter", "localize", "upload_dir", "check_adapter_path", "save_adam_state",
           "load_adam_state"]

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


# -- the peft config ---------------------------------------------------------------------------

@dataclass
class LoraPair:
    """One LoRA-adapted linear: its name and its ``A`` (r×in) and ``B`` (out×r) linears."""

    name: str
    A: torch.nn.Linear
    B: torch.nn.Linear

    @property
    def names(self) -> tuple[str, str]:
        return f"{self.name}.lora_A", f"{self.name}.lora_B"


def lora_pairs(model) -> list[LoraPair]:
    """The model's LoRA pairs in module order (this order fixes the gradient's flattening)."""
    pairs = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            pairs.append(LoraPair(name, module.lora_A["default"], module.lora_B["default"]))
    if not pairs:
        raise ModelError("the model has no LoRA layers")
    return pairs


def lora_config(model, *, r: int, alpha: float, target_modules):
    """A fresh LoRA's peft config (dropout 0) for ``model``.

    Raises:
        ModelError: when a target module is not in the model, listing the linear layers it has.
    """
    from peft import LoraConfig

    linears = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    missing = [t for t in target_modules if t not in linears]
    if missing:
        raise ModelError(f"target modules {missing} are not in the model; its linear layers "
                         f"are: {', '.join(sorted(linears))}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM",
                      # GPT-2's Conv1D stores its weight transposed
                      fan_in_fan_out=any(linears[t] == "Conv1D" for t in target_modules))


def attach_lora(model, *, r: int = 8, alpha: float = 32.0,
                target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj",
                                                               "o_proj"),
                adapter: str | None = None, seed: int = 0):
    """Wrap ``model`` as a peft model with a fresh LoRA (dropout 0, ``B = 0``, ``A`` drawn from
    ``seed``, so every actor builds the same proxy) or the adapter saved in the folder ``adapter``.
    The base weights are frozen; the model is in eval mode.

    Raises:
        ModelError: when a target module is not in the model (the valid names are listed), or the
            adapter folder cannot be loaded.
    """
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        try:
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        except (OSError, ValueError) as e:
            raise ModelError(f"adapter {adapter!r} could not be loaded: "
                             f"{str(e).splitlines()[0]}") from None
    else:
        config = lora_config(model, r=r, alpha=alpha, target_modules=target_modules)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    peft_model.eval()
    return peft_model


# -- the Adam-state format ---------------------------------------------------------------------

def save_adam_state(optimizer: torch.optim.Optimizer, model, path: str) -> None:
    """Save the Adam moments of every LoRA matrix as safetensors, the format the features stage
    reads: keys ``<module>.lora_A.exp_avg``, ``.exp_avg_sq`` (and ``lora_B``)."""
    from safetensors.torch import save_file

    tensors = {}
    for pair in lora_pairs(model):
        for key, w in zip(pair.names, (pair.A.weight, pair.B.weight), strict=False):
            state = optimizer.state.get(w, {})
            if "exp_avg" in state:
                tensors[f"{key}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
                tensors[f"{key}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
    if not tensors:
        raise FeatureError("the optimizer holds no Adam state for the LoRA matrices")
    save_file(tensors, path)


def load_adam_state(path: str, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Read :func:`save_adam_state`'s file as ``(m, v)`` per LoRA matrix, in flattening order."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    state = []
    for pair in lora_pairs(model):
        for key, w in zip(pair.names, (pair.A.weight, pair.B.weight), strict=False):
            try:
                m, v = tensors[f"{key}.exp_avg"], tensors[f"{key}.exp_avg_sq"]
            except KeyError:
                raise FeatureError(f"{path}: no Adam state for {key}") from None
            if m.shape != w.shape:
                raise FeatureError(f"{path}: Adam state of {key} is {tuple(m.shape)}, the "
                                   f"adapter's matrix is {tuple(w.shape)}")
            state.append((m, v))
    return state
