"""A tiny random-weight Llama and its tokenizer, built locally (no model hub).

vLLM needs a model folder to start; the replay and the oracle only need the
engine's scheduling and KV cache, so the model is as small as vLLM's CPU
backend allows (head size 32, two layers) and its weights are random. The
tokenizer is a byte-level BPE trained on a fixed synthetic corpus, so the same
call builds the same folder, byte for byte, on any machine.

``build_tiny_model(path)`` writes the folder once (a finished build is marked
by ``cachewise-tiny-model.json``; a partial one is rebuilt) and returns it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

#: bump when the model or tokenizer recipe changes: an older build is rebuilt
RECIPE_VERSION = 1
VOCAB_SIZE = 4096
#: the size of the vocabulary the BPE trainer reaches on the fixed corpus (below VOCAB_SIZE): the
#: model's ``vocab_size``, and the token range a replay against it uses (a test checks it)
TINY_VOCAB_SIZE = 2106
MAX_MODEL_LEN = 32768
_MARK = "cachewise-tiny-model.json"


def _corpus() -> list[str]:
    """A fixed, content-free training corpus: numbers, words of letters, code-like symbols."""
    words = [f"w{i:x}" for i in range(2000)] + [f"{i}" for i in range(1000)]
    lines = []
    for i in range(0, len(words), 16):
        lines.append(" ".join(words[i : i + 16]) + " (){}[];:=+-*/<>.,'\"#_\n")
    return lines


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] if m['content'] is string "
                          "else '' }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(path))


def _write_model(path: Path, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=MAX_MODEL_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)


def build_tiny_model(path: str | os.PathLike) -> Path:
    """The tiny model folder at ``path``, built there if it is not already complete."""
    path = Path(path)
    mark = path / _MARK
    if mark.exists():
        try:
            if json.loads(mark.read_text()).get("recipe") == RECIPE_VERSION:
                return path
        except (OSError, ValueError):
            pass
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _write_tokenizer(tmp)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tmp)))
    _write_model(tmp, vocab)
    (tmp / _MARK).write_text(json.dumps({"recipe": RECIPE_VERSION, "vocab_size": vocab,
                                         "what": "random-weight Llama for CacheWise replay (no hub)"}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
