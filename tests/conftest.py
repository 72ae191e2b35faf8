"""Shared fixtures: a tiny BPE tokenizer trained on the spot and tiny random causal LMs.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a few
hundred generated lines (so that " A".."Z" and "A".."Z" are single tokens), and
the models are built from transformers configs with random weights.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("LLMCAL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    words = ("the following are multiple choice questions with answers about what which is of a an to in "
             "and answer letter correct option question subject math arithmetic compute number sum "
             "larger smaller true false value key fact").split()
    lines = []
    for i in range(400):
        w = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8))
        lines.append(f"{w} {i} + {i * 3 % 97} = {i + i * 3 % 97}?")
    for L in string.ascii_uppercase:
        lines += [f"Answer: {L}", f"{L}. option {L}", f"\n{L}. x", f" {L}", L] * 5
    return lines


def build_tokenizer(save_dir: Path | None = None, *, letters_single: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Without merges (vocab = the byte alphabet) " A" is two tokens: the bad-tokenizer case.
    trainer = trainers.BpeTrainer(vocab_size=600 if letters_single else 259, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def build_tiny_llama(save_dir: Path, tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(save_dir, safe_serialization=True)
    tokenizer.save_pretrained(save_dir)
    return save_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, tmp_path, monkeypatch):
    # GGUF conversions are cached per machine; tests share one cache for the session.
    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path_factory.getbasetemp() / "llmcal-cache"))
    # The scoring cache is per test: a test sees only the scores it made itself.
    import llmcal.cache

    monkeypatch.setattr(llmcal.cache, "default_cache_dir", lambda: tmp_path / "score-cache")
    # Training runs in one process unless a test asks for more (--processes auto would start two on a 2-core
    # machine: tests/test_train_launch.py covers that path).
    import llmcal.train.launch

    monkeypatch.setattr(llmcal.train.launch, "cpu_cores", lambda: 1)


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def mcq_file(tmp_path) -> Path:
    recs = []
    for i in range(24):
        k = 2 + i % 4  # mixed K: 2..5 options
        recs.append({"id": f"q{i}", "question": f"What is {i} + {i % 7}?",
                     "choices": [str(i + i % 7 + d) for d in range(k)], "answer": i % k,
                     "subject": "math" if i % 2 else "sums"})
    return write_jsonl(tmp_path / "mcq.jsonl", recs)


def run_two_processes(tmp_path: Path, name: str, source: str, *args: object, timeout: int) -> None:
    """Run the Python ``source`` (written to ``tmp_path/name``) in two processes under torch's launcher
    (``torchrun --standalone``: gloo, one thread each, offline), with ``tmp_path`` and ``args`` as its arguments.
    The test fails on a hang or a non-zero exit, with the processes' output."""
    import subprocess
    import sys

    script = tmp_path / name
    script.write_text(source)
    env = {**os.environ, "LLMCAL_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - a hang is a failure, with its output
        pytest.fail(f"torchrun timed out\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
