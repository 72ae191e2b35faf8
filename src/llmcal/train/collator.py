"""Training examples and batches, built from the scoring engine's encoded questions.

One example is the prompt (the exact tokens the scoring engine scores), the
K option-letter token ids, the answer index and the *targets*: for each input
position t, the token to predict there (-100 for none).  Without explanations
the only target is the correct letter at the answer position (the last prompt
token).  With ``include_explanation`` the sequence continues after the letter
with ``"\\n" + explanation`` and the end-of-sequence token, and each of those
tokens is a target too (the SFT loss then covers the explanation as well).
The answer position and the K-letter logits stay those of the prompt.

Batches are packed by default: the batch's questions end to end in one row,
with position ids that restart at 0 for each question and no attention mask.
That is transformers' packed layout (the layout of its
``DataCollatorWithFlattening``): its mask builder reads the question
boundaries off the position ids, so each question attends only to itself and
its rotary positions are its own, as if it had a row to itself.  No compute
goes to padding: a random batch of MMLU questions (26 to 600+ tokens) padded
to its longest question is often half padding.  ``McqCollator(packed=False)``
gives right-padded rows instead, like the scoring engine's, where the answer
position of a row is where its prompt ends; for those, ``LengthBucketSampler``
orders an epoch so that questions of similar length share a batch (little
padding) while the batches and their order still change from epoch to epoch.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch

from ..prompts import EncodedQuestion

IGNORE = -100


def build_examples(encoded: Sequence[EncodedQuestion], tokenizer: Any = None,
                   include_explanation: bool = False) -> list[dict]:
    """One feature dict per question (plain lists; ``collate`` makes tensors)."""
    out = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for e in encoded:
        prompt = list(e.input_ids)
        letter = e.letter_ids[e.question.answer]
        tail: list[int] = []
        if include_explanation and e.question.explanation:
            tail = list(tokenizer("\n" + e.question.explanation.strip(), add_special_tokens=False)["input_ids"])
            if eos is not None:
                tail.append(eos)
        seq = prompt + [letter] + tail
        answer_pos = len(prompt) - 1
        targets = [IGNORE] * answer_pos + seq[answer_pos + 1:]
        out.append({"input_ids": seq[:-1], "targets": targets, "answer_pos": answer_pos,
                    "letter_ids": list(e.letter_ids), "answer": e.question.answer})
    return out


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[dict]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class McqCollator:
    """Feature dicts -> tensors: input_ids, targets, answer_pos, letter_ids, letter_mask, answer, and
    position_ids (packed, one row) or attention_mask (right-padded, one row per question).

    ``answer_pos`` is each question's answer position in its row (packed: in the one row)."""

    def __init__(self, pad_id: int, packed: bool = False):
        self.pad_id = int(pad_id)
        self.packed = bool(packed)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self._packed(features) if self.packed else self._padded(features)

    @staticmethod
    def _letters(features: Sequence[dict]) -> dict[str, torch.Tensor]:
        K = max(len(f["letter_ids"]) for f in features)
        letters = torch.zeros((len(features), K), dtype=torch.long)
        lmask = torch.zeros((len(features), K), dtype=torch.bool)
        for r, f in enumerate(features):
            letters[r, :len(f["letter_ids"])] = torch.tensor(f["letter_ids"])
            lmask[r, :len(f["letter_ids"])] = True
        return {"letter_ids": letters, "letter_mask": lmask,
                "answer": torch.tensor([f["answer"] for f in features], dtype=torch.long)}

    def _packed(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        return {
            "input_ids": torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "targets": torch.tensor([t for f in features for t in f["targets"]], dtype=torch.long)[None],
            "answer_pos": starts + torch.tensor([f["answer_pos"] for f in features], dtype=torch.long),
            **self._letters(features),
        }

    def _padded(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = len(features)
        L = max(len(f["input_ids"]) for f in features)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        targets = torch.full((n, L), IGNORE, dtype=torch.long)
        for r, f in enumerate(features):
            m = len(f["input_ids"])
            ids[r, :m] = torch.tensor(f["input_ids"])
            mask[r, :m] = 1
            targets[r, :m] = torch.tensor(f["targets"])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "targets": targets,
            "answer_pos": torch.tensor([f["answer_pos"] for f in features], dtype=torch.long),
            **self._letters(features),
        }


class LengthBucketSampler(torch.utils.data.Sampler):
    """An epoch's order: batches of similar length, in random order, different every epoch.

    Each epoch sorts the examples by log length plus uniform noise in
    [-jitter, jitter] (lengths within about ``2 * jitter`` of each other trade
    places at random), cuts the sorted list into batches of ``batch_size`` and
    shuffles the batches.  A batch then pads to at most about ``exp(2 * jitter)``
    times its shortest row (22% for the default 0.1), where a random batch of
    MMLU questions (26 to 600+ tokens) often pads to twice its real tokens.
    Randomness comes from torch's global generator, which the Trainer seeds and
    restores on resume, as for its own random sampler.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, jitter: float = 0.1):
        if batch_size < 1 or jitter < 0:
            raise ValueError(f"batch_size must be >= 1 and jitter >= 0 (got {batch_size}, {jitter})")
        self.log_lengths = torch.tensor([math.log(max(int(n), 1)) for n in lengths], dtype=torch.float64)
        self.batch_size = int(batch_size)
        self.jitter = float(jitter)

    def __len__(self) -> int:
        return len(self.log_lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.log_lengths)
        noise = (torch.rand(n, dtype=torch.float64) * 2 - 1) * self.jitter
        order = torch.argsort(self.log_lengths + noise).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        for b in torch.randperm(len(batches)).tolist():
            yield from batches[b]
