"""A tiny random-weight Llama and its tokenizer, built locally (no model hub).

vLLM needs a model folder to start; the replay and the oracle only need the
engine's scheduling and KV cache, so the model is as small as vLLM's CPU
backend allows (head size 32, two layers) and its weights are random. The
tokenizer is a byte-level BPE trained on a fixed synthetic corpus, so the same
call builds the same folder, byte for byte, on any machine.

``build_tiny_model(path)`` writes the folder once (a finished build is marked
by ``cachewise-tiny-model.json``; a partial one is rebuilt) and returns it.

``build_tiny_model(path, hidden_size=H, layers=L)`` builds a larger random
model of the same recipe (head size 32, ``H / 32`` heads, ``H / 64`` KV heads,
an MLP of ``2 H``): the same scheduler and cache, but steps that cost more.
On a CPU whose bf16 matmuls are fast, the default model's prefill is so cheap
(~2 us a token) that an evicted prefix costs little to recompute; ``H=1024,
L=4`` prices prefill at ~130-190 us a token, the regime where evictions cost
session time (``experiments/live_ratios.py --model-hidden 1024 --model-layers 4``).
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


#: the default model's size: hidden size 128, two layers
HIDDEN_SIZE, LAYERS = 128, 2


def _write_model(path: Path, vocab: int, hidden_size: int = HIDDEN_SIZE, layers: int = LAYERS) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=hidden_size // 32,
                      num_key_value_heads=hidden_size // 64, head_dim=32,
                      max_position_embeddings=MAX_MODEL_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)


def build_tiny_model(path: str | os.PathLike, *, hidden_size: int = HIDDEN_SIZE, layers: int = LAYERS) -> Path:
    """The tiny model folder at ``path``, built there if it is not already complete (a folder of
    another size or recipe is rebuilt). ``hidden_size``: a multiple of 64 (head size 32, half as
    many KV heads as heads); ``layers`` at least 1."""
    if hidden_size < 64 or hidden_size % 64:
        raise ValueError(f"hidden_size {hidden_size}: must be a positive multiple of 64 (heads of size 32, "
                         "half as many KV heads)")
    if layers < 1:
        raise ValueError(f"layers {layers}: must be at least 1")
    path = Path(path)
    mark = path / _MARK
    size = {} if (hidden_size, layers) == (HIDDEN_SIZE, LAYERS) else {"hidden_size": hidden_size, "layers": layers}
    if mark.exists():
        try:
            made = json.loads(mark.read_text())
            if made.get("recipe") == RECIPE_VERSION and made.get("size", {}) == size:
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
    _write_model(tmp, vocab, hidden_size, layers)
    (tmp / _MARK).write_text(json.dumps({"recipe": RECIPE_VERSION, "vocab_size": vocab, **({"size": size} if size else {}),
                                         "what": "random-weight Llama for CacheWise replay (no hub)"}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
