"""``fuse extract-lora``: a PEFT LoRA adapter from the truncated SVD of each linear layer's delta.

As mergekit 0.1.5's ``mergekit-extract-lora``: for every ``nn.Linear`` (and, with
``--embed-lora``, ``nn.Embedding``) of the fine-tuned model, Δ = W_model − W_base is
factored by SVD, Δ ≈ U_r S_r V_rᵀ, and stored as ``lora_A = √S_r V_rᵀ``, ``lora_B = U_r √S_r``
(``--no-distribute-scale``: ``A = S_r V_rᵀ``, ``B = U_r``); ``lora_alpha = r`` so PEFT's
scale is 1.  Embeddings are decomposed transposed (``lora_embedding_A/B``).  Input/output
embeddings without ``--embed-lora``, modules named by ``--save-module`` and modules of
other kinds (norms) are stored whole (``modules_to_save``).  The rank is ``--rank``, capped
by each matrix's smaller side; ``full`` keeps every singular value (exact up to float error).

The relative reconstruction error of each layer, ‖Δ − BA‖_F / ‖Δ‖_F, is the norm of the
dropped singular values over the norm of all of them; it is printed and written to
``extract_lora_report.json``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import click

from fusion_core import ConfigError, InputError


def _rank(text: str) -> int | None:
    if text == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--rank must be a positive integer or full, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"--rank must be a positive integer or full, got {text!r}")
    return value


def decompose(delta, rank: int | None, *, distribute_scale: bool = True, sv_epsilon: float = 0.0):
    """``(A, B, kept, relative error)`` for ``delta ≈ B @ A`` (mergekit's factorisation)."""
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    keep = s.shape[0] if rank is None else min(rank, s.shape[0])
    if sv_epsilon > 0:
        keep = min(int((s > sv_epsilon).sum()), keep)
    keep = max(keep, 1)
    if distribute_scale:
        root = torch.sqrt(s[:keep])
        a, b = root[:, None] * vh[:keep], u[:, :keep] * root[None, :]
    else:
        a, b = s[:keep, None] * vh[:keep], u[:, :keep].clone()
    total = float(torch.linalg.vector_norm(s.double()))
    dropped = float(torch.linalg.vector_norm(s[keep:].double())) if keep < s.shape[0] else 0.0
    return a.contiguous(), b.contiguous(), keep, (dropped / total if total > 0 else 0.0)


def _meta_model(folder: str):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def extract(
    base: str,
    model: str,
    output: str,
    *,
    rank: int | None,
    embed_lora: bool = False,
    modules_to_save: tuple[str, ...] = (),
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    sv_epsilon: float = 0.0,
    distribute_scale: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the adapter to ``output``; returns the report (per-module rank and relative error)."""
    import torch
    from torch import nn

    from fusion_core import atomic_output, open_reader, save_state_dict_folder

    from .mergekit import require_transformers

    require_transformers("fuse extract-lora")
    from fusion_core import check_output_path

    check_output_path(output, overwrite=overwrite, inputs=(base, model))  # before any work: never an input or its folder
    for path in (base, model):
        if not (Path(path) / "config.json").is_file():
            raise InputError(f"{path} is not a Hugging Face model folder (no config.json); extract-lora needs the model's config")
    skeleton = _meta_model(model)
    embed_in, embed_out = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    base_reader, model_reader = open_reader(base, label=base), open_reader(model, label=model)
    try:
        if embed_lora and base_reader.shape(_weight_name(skeleton, embed_in)) != model_reader.shape(_weight_name(skeleton, embed_in)):
            embed_lora = False  # as mergekit: a resized vocabulary goes to modules_to_save
        state: dict[str, torch.Tensor] = {}
        saved: list[str] = list(modules_to_save)
        ranks: dict[str, int] = {}
        report: dict[str, dict] = {}
        has_bias = False
        for name, module in skeleton.named_modules():
            weight = f"{name}.weight"
            if weight not in model_reader:
                continue
            key = name.split(".")[-1]
            is_embedding = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
            if is_embedding and not embed_lora and not any(re.search(r, name) for r in exclude) and key not in saved:
                saved.append(key)
            if name in saved or key in saved:
                _save_whole(state, model_reader, name)
                continue
            if (include and not any(re.search(r, name) for r in include)) or any(re.search(r, name) for r in exclude):
                continue
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                if key not in saved:
                    saved.append(key)
                _save_whole(state, model_reader, name)
                continue
            transpose = isinstance(module, nn.Embedding)
            if weight not in base_reader:
                raise InputError(f"the base {base} has no tensor {weight!r}")
            delta = model_reader.get(weight).float() - base_reader.get(weight).float()
            a, b, kept, error = decompose(delta.T if transpose else delta, rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon)
            dtype = model_reader.dtype(weight)
            prefix = f"base_model.model.{name}"
            if transpose:
                state[f"{prefix}.lora_embedding_A"], state[f"{prefix}.lora_embedding_B"] = a.to(dtype), b.to(dtype)
            else:
                state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = a.to(dtype), b.to(dtype)
            bias = f"{name}.bias"
            if bias in model_reader and bias in base_reader:
                diff = model_reader.get(bias) - base_reader.get(bias)
                if bool(diff.any()):
                    state[f"{prefix}.lora_B.bias"] = diff
                    has_bias = True
            ranks[name] = kept
            report[name] = {"rank": kept, "relative_error": error}
        if not ranks:
            raise InputError("no linear layer to decompose (check --include-regex/--exclude-regex)")
        r = max(ranks.values())
        different = {k: v for k, v in ranks.items() if v != r}
        config = {
            "base_model_name_or_path": str(base),
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": r,
            "rank_pattern": different,
            "alpha_pattern": different,
            "target_modules": sorted({k.split(".")[-1] for k in ranks}),
            "modules_to_save": saved or None,
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "lora_bias": has_bias,
            "inference_mode": True,
        }
        out = Path(output)
        with atomic_output(out, overwrite=overwrite, inputs=(base, model)) as tmp:
            tmp.mkdir()
            save_state_dict_folder(state, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "extract_lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        base_reader.close()
        model_reader.close()


def _weight_name(skeleton, module) -> str:
    for name, m in skeleton.named_modules():
        if m is module:
            return f"{name}.weight"
    return ""


def _save_whole(state: dict, reader, name: str) -> None:
    for suffix in ("weight", "bias"):
        tensor = f"{name}.{suffix}"
        if tensor in reader:
            state[f"base_model.model.{tensor}"] = reader.get(tensor)


@click.command("extract-lora")
@click.option("--base", required=True, metavar="PATH", help="The base model (an HF folder).")
@click.option("--model", required=True, metavar="PATH", help="The fine-tuned model (an HF folder, same architecture).")
@click.option("--rank", "rank_text", required=True, metavar="R", help="LoRA rank (the largest; smaller matrices get less), or full (exact).")
@click.option("--output", "-o", required=True, metavar="DIR", help="The PEFT adapter folder to write.")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True, help="Decompose embeddings too (else they are saved whole, as mergekit).")
@click.option("--save-module", "modules_to_save", multiple=True, metavar="NAME", help="Save this module whole (modules_to_save); repeat.")
@click.option("--include-regex", "-i", "include", multiple=True, metavar="RE", help="Only modules whose name matches.")
@click.option("--exclude-regex", "-e", "exclude", multiple=True, metavar="RE", help="Skip modules whose name matches.")
@click.option("--sv-epsilon", default=0.0, show_default=True, help="Drop singular values at or below this.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True, help="Split √S between A and B (else S goes to A).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def extract_lora_command(base, model, rank_text, output, embed_lora, modules_to_save, include, exclude, sv_epsilon, distribute_scale, overwrite):
    """Extract a LoRA adapter (PEFT format) from MODEL − BASE by truncated SVD, as mergekit-extract-lora does.

    \b
      fuse extract-lora --base base/ --model chat/ --rank 32 -o chat-lora/
    """
    report = extract(
        base,
        model,
        output,
        rank=_rank(rank_text),
        embed_lora=embed_lora,
        modules_to_save=modules_to_save,
        include=include,
        exclude=exclude,
        sv_epsilon=sv_epsilon,
        distribute_scale=distribute_scale,
        overwrite=overwrite,
    )
    from rich.table import Table

    from fusion_core import console

    table = Table(title=f"LoRA extracted to {output}: relative reconstruction error per layer")
    table.add_column("module")
    table.add_column("rank", justify="right")
    table.add_column("‖Δ − BA‖/‖Δ‖", justify="right")
    for name, row in report.items():
        table.add_row(name, str(row["rank"]), f"{row['relative_error']:.2e}")
    worst = max(row["relative_error"] for row in report.values())
    console().print(table)
    console().print(f"{len(report)} module(s); largest relative error {worst:.2e}" + ("" if math.isfinite(worst) else " (non-finite!)"))
