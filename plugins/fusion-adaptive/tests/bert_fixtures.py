"""A tiny BERT world for the fusion-adaptive tests: the architecture of the ``mini`` benchmark, from a config.

The encoder is a 2-layer BERT (transformers ``BertModel``, built from a ``BertConfig``, random
weights) mean-pooled over the non-padding tokens, as the mini benchmark's MiniLM encoder: token
ids ``(batch, length)`` with 0 = padding → ``(batch, hidden)``.  Three synthetic 3-class tasks
(the class is the token range most of a sequence is drawn from), each with a fixed random head;
the experts fine-tune the encoder with the token embeddings frozen (as mini's experts do), so
those tensors' task vectors are exactly zero.
"""

from __future__ import annotations

import torch
from adaptive_fixtures import MemoryPool, MemoryTaskPool, batches, finetune
from torch import nn

from fusion_core.run_context import RunContext

VOCAB, HIDDEN, CLASSES, LENGTH = 64, 16, 3, 10
TASKS = ("alpha", "beta", "gamma")
FROZEN = ("bert.embeddings.word_embeddings.weight",)


class BertEncoder(nn.Module):
    def __init__(self) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        hidden = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def make_task(seed: int, n_train: int = 96, n_test: int = 48) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.randint(0, CLASSES, (n,), generator=g)
    band = (VOCAB - 1) // CLASSES
    ids = 1 + y.unsqueeze(1) * band + torch.randint(0, band, (n, LENGTH), generator=g)
    noise = torch.rand(n, LENGTH, generator=g) < 0.3
    ids = torch.where(noise, torch.randint(1, VOCAB, (n, LENGTH), generator=g), ids)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    ids[torch.arange(LENGTH).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    head = nn.Linear(HIDDEN, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, HIDDEN, generator=g))
        head.bias.zero_()
    head.requires_grad_(False)
    return {"train": (ids[:n_train], y[:n_train]), "test": (ids[n_train:], y[n_train:]), "head": head}


class BertWorld:
    """The base, three fine-tunes, the tasks, and pools over them (built in about a second)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.tasks = {name: make_task(200 + i) for i, name in enumerate(TASKS)}
        self.base = BertEncoder().eval()
        self.models = {name: finetune(self.base, task, steps=30, lr=1e-2, batch=16, frozen=FROZEN).eval().requires_grad_(False)
                       for name, task in self.tasks.items()}

    def pool(self) -> MemoryPool:
        data = {(n, "train"): batches(*t["train"], size=16) for n, t in self.tasks.items()}
        return MemoryPool(self.base, self.models, data)

    def taskpool(self) -> MemoryTaskPool:
        return MemoryTaskPool(self.tasks)

    def ctx(self, seed: int = 0) -> RunContext:
        return RunContext(seed=seed, taskpool=self.taskpool(), show_progress=False)

    def task_arithmetic(self, lam: float) -> dict[str, torch.Tensor]:
        base = self.base.state_dict()
        return {k: v + lam * sum(m.state_dict()[k] - v for m in self.models.values()) if v.is_floating_point() else v
                for k, v in base.items()}
