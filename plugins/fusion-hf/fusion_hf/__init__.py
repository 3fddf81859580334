"""fusion-hf: Hugging Face model pools and task pools for fusion.

Model pools: ``hf`` (any allowlisted auto class), ``hf_clip_vision``, ``hf_causal_lm``,
``hf_seq_classification``, ``hf_seq2seq``.  Task pools: ``clip_zero_shot``,
``text_classification``, ``causal_lm_perplexity``.  Nothing heavy (torch,
transformers, datasets) is imported until a pool loads a model or a dataset.
"""

from __future__ import annotations

__version__ = "0.1.0"
