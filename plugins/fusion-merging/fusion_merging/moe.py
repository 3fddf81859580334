"""``fuse moe CONFIG.yml --output DIR``: a Mixture-of-Experts model from dense experts (mergekit-moe's config).

The config is mergekit-moe's (0.1.5): ``base_model``, ``experts`` (``source_model``,
``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``),
``gate_mode`` (``hidden`` = ``hidden_last``: default, ``hidden_avg``, ``cheap_embed``, ``random``,
``uniform_random``),
``experts_per_token`` (2), ``shared_experts``, ``dtype``, ``architecture``.

- **Output**: Mixtral (Llama/Mistral experts, no shared expert; the default, as mergekit)
  or Qwen2-MoE (exactly one shared expert, which gets its own gate), in transformers 5's
  layout (each layer's experts fused: ``experts.gate_up_proj`` = [gate; up] per expert,
  ``experts.down_proj``).  Everything outside the MLPs comes from the base; expert ``e``'s MLP
  of layer ``i`` is layer ``i``'s MLP of its source model (plus ``noise_scale``·N(0, 1), and
  ``down_proj`` times ``residual_scale``).
- **Gates** (one vector per expert and layer, the router's rows), as mergekit computes them:
  ``hidden``: the base's hidden state entering each layer at the last token of each positive
  prompt (``bos`` + prompt, left-padded; ``hidden_avg``: the mean over all positions), averaged over the prompts, minus the same for the
  negative prompts, normalised; ``cheap_embed``: the normalised sum of the prompts' token
  embeddings, the same for every layer; ``random``: N(0, 1); ``uniform_random``: U(±1/√hidden).
  The base runs in fp32 here (mergekit loads it in bfloat16).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fusion_core import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}


def _experts(value: Any, where: str, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {what} must be a non-empty list of {{source_model: PATH, positive_prompts: [...]}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "source_model" not in item or set(item) - EXPERT_KEYS:
            bad = sorted(set(item) - EXPERT_KEYS) if isinstance(item, dict) else []
            raise ConfigError(f"{where}: {what}[{i}] needs source_model" + (f"; unsupported key(s) {', '.join(bad)}" if bad else ""))
        for key in ("positive_prompts", "negative_prompts"):
            prompts = item.get(key)
            if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)):
                raise ConfigError(f"{where}: {what}[{i}].{key} must be a list of strings")
        out.append(dict(item))
    return out


def read_config(path: str) -> dict:
    """Validate a mergekit-moe YAML; refuse what cannot be honoured by name."""
    from fusion_core import load_yaml_file

    where = f"moe config {path}"
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    extra = sorted(set(data) - TOP_KEYS)
    if extra:
        raise ConfigError(f"{where}: unsupported key(s) {', '.join(extra)} (fuse moe reads {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(data.get("base_model"), str):
        raise ConfigError(f"{where}: base_model must be a path")
    config = {
        "base_model": data["base_model"],
        "experts": _experts(data.get("experts"), where, "experts"),
        "shared_experts": _experts(data["shared_experts"], where, "shared_experts") if data.get("shared_experts") else [],
        "gate_mode": data.get("gate_mode", "hidden"),
        "experts_per_token": data.get("experts_per_token", 2),
        "dtype": data.get("dtype"),
        "architecture": data.get("architecture"),
        "where": where,
    }
    if config["gate_mode"] not in GATE_MODES:
        raise ConfigError(f"{where}: gate_mode {config['gate_mode']!r} is not one of {', '.join(GATE_MODES)}")
    k = config["experts_per_token"]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(config["experts"]):
        raise ConfigError(f"{where}: experts_per_token must be an integer from 1 to the number of experts ({len(config['experts'])})")
    if config["gate_mode"] not in ("random", "uniform_random"):
        for i, expert in enumerate(config["experts"]):
            if not expert.get("positive_prompts"):
                raise ConfigError(f"{where}: experts[{i}] has no positive_prompts (gate_mode {config['gate_mode']} needs them)")
        signature = [(tuple(e["positive_prompts"]), tuple(e.get("negative_prompts") or [])) for e in config["experts"]]
        if len(config["experts"]) > 1 and len(set(signature)) == 1:
            raise ConfigError(f"{where}: every expert has the same prompts, so the router cannot tell them apart")
    arch = (config["architecture"] or "").lower()
    if arch and not ("mixtral".startswith(arch) or "qwen".startswith(arch)):
        raise ConfigError(f"{where}: architecture {config['architecture']!r} is not supported (fuse moe writes mixtral or qwen)")
    shared = len(config["shared_experts"])
    if arch.startswith("m") or (not arch and shared == 0):
        config["output"] = "mixtral"
        if shared:
            raise ConfigError(f"{where}: Mixtral has no shared experts; use architecture: qwen with one shared expert")
    else:
        config["output"] = "qwen2_moe"
        if shared != 1:
            raise ConfigError(f"{where}: a Qwen2-MoE output needs exactly one shared expert, got {shared}")
        if config["gate_mode"] not in ("random", "uniform_random") and not config["shared_experts"][0].get("positive_prompts"):
            raise ConfigError(f"{where}: the shared expert needs positive_prompts for gate_mode {config['gate_mode']}")
    return config


# --------------------------------------------------------------------------- gates


def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def gate_vectors(config: dict, base_cfg, tokenizer, seed: int, experts: list[dict]):
    """(layers, len(experts), hidden) router rows, as mergekit-moe computes them."""
    import torch

    layers, hidden = base_cfg.num_hidden_layers, base_cfg.hidden_size
    mode = config["gate_mode"]
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((layers, len(experts), hidden), generator=gen)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden), generator=gen) * 2 * scale - scale
    if mode == "cheap_embed":
        from fusion_core import open_reader

        with open_reader(config["base_model"]) as reader:
            embed = reader.get("model.embed_tokens.weight").float()

        def states(tokens):
            onehot = torch.nn.functional.one_hot(tokens["input_ids"], num_classes=embed.shape[0]).float()
            h = ((onehot @ embed) * tokens["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)

    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32).eval()

        def states(tokens):
            with torch.no_grad():
                out = model(**tokens, output_hidden_states=True, return_dict=True)
            h = torch.stack(out.hidden_states[:-1])  # (layers, batch, seq, hidden): each layer's input
            h = h.sum(dim=2) / h.shape[2] if mode == "hidden_avg" else h[:, :, -1, :]
            return h.sum(dim=1) / h.shape[1]

    rows = []
    for expert in experts:
        h = states(_tokenize(tokenizer, expert["positive_prompts"]))
        if expert.get("negative_prompts"):
            h = h - states(_tokenize(tokenizer, expert["negative_prompts"]))
        rows.append(h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=0).permute(1, 0, 2)


# --------------------------------------------------------------------------- the model


def output_config(config: dict, base_cfg, dtype_name: str | None):
    import transformers

    if config["output"] == "mixtral":
        if not isinstance(base_cfg, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_cfg.to_dict())
            mistral.sliding_window = None
            base_cfg = mistral
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = len(config["experts"])
    else:
        out = transformers.Qwen2MoeConfig(**base_cfg.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = len(config["experts"])
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = config["experts_per_token"]
    out.sliding_window = None
    if dtype_name:
        out.dtype = dtype_name
    return out


def moe_tensor(name: str, shape, base: Any, mlp: Any, gates: "torch.Tensor", n: int, where: str) -> "torch.Tensor":
    """Output tensor ``name`` of a Mixtral / Qwen2-MoE model (transformers 5 layout) from dense parts.

    ``base``: the dense base's tensors (``in`` and ``get(name)``: everything outside the MLPs);
    ``mlp(i, layer, part)``: expert ``i``'s ``part`` (``gate_proj``, ``up_proj``, ``down_proj``)
    weight of ``layer`` (``i = n``: the shared expert); ``gates``: ``(layers, experts, hidden)``
    router rows, the first ``n`` for the routed experts.  Shared by ``fuse moe`` and the
    ``mixtral_upcycling`` / ``mixtral_merging`` methods (:mod:`fusion_merging.mixtral`).
    """
    import torch

    parts = name.split(".")
    if ".mlp." not in name:
        if name in base:
            return base.get(name)
        if name.endswith("_proj.bias"):  # Qwen2 attention has biases; a Llama/Mistral base has none
            return torch.zeros(shape)
        raise InputError(f"{where}: the base has no tensor {name!r}")
    layer = int(parts[2])
    tail = ".".join(parts[4:])
    if tail == "gate.weight":
        return gates[layer, :n]
    if tail == "shared_expert_gate.weight":
        return gates[layer, n:]
    if tail == "experts.gate_up_proj":
        return torch.stack([torch.cat([mlp(i, layer, "gate_proj"), mlp(i, layer, "up_proj")]) for i in range(n)])
    if tail == "experts.down_proj":
        return torch.stack([mlp(i, layer, "down_proj") for i in range(n)])
    if tail.startswith("shared_expert."):
        return mlp(n, layer, tail.split(".")[1])
    raise InputError(f"{where}: unexpected output tensor {name!r}")


def build(config: dict, output: str, *, seed: int = 0, overwrite: bool = False) -> Path:
    from .mergekit import require_transformers

    require_transformers("fuse moe")
    import torch
    import transformers

    from fusion_core import ModelWriter, atomic_output, check_output_path, open_reader, parse_dtype, write_model_card

    where = config["where"]
    models = [config["base_model"]] + [e["source_model"] for e in config["experts"] + config["shared_experts"]]
    check_output_path(output, overwrite=overwrite, inputs=models)  # before any work: never an input or its folder
    for path in models:
        if not (Path(path) / "config.json").is_file():
            raise InputError(f"{where}: {path} is not a local Hugging Face model folder")
    base_cfg = transformers.AutoConfig.from_pretrained(config["base_model"])
    allowed = ("llama", "mistral") if config["output"] == "mixtral" else ("llama", "mistral", "qwen2")
    for path in models:
        model_type = transformers.AutoConfig.from_pretrained(path).model_type
        if model_type != base_cfg.model_type or model_type not in allowed:
            raise InputError(f"{where}: {path} is a {model_type} model; {config['output']} output needs {' or '.join(allowed)} models of one type")
    dtype = parse_dtype(config["dtype"], what="dtype") if config["dtype"] else None
    dtype = dtype or getattr(base_cfg, "dtype", None) or torch.float32
    dtype = parse_dtype(str(dtype), what="dtype") if not isinstance(dtype, torch.dtype) else dtype
    tokenizer = None
    if config["gate_mode"] not in ("random", "uniform_random"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(config["base_model"])
        tokenizer.padding_side = "left"
        tokenizer.pad_token_id = tokenizer.bos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    gates = gate_vectors(config, base_cfg, tokenizer, seed, config["experts"] + config["shared_experts"])
    n = len(config["experts"])
    out_cfg = output_config(config, base_cfg, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(out_cfg)
    entries = [(k, tuple(v.shape), dtype) for k, v in skeleton.state_dict().items()]
    del skeleton
    noise = torch.Generator().manual_seed(seed + 1)
    readers = {path: open_reader(path, label=path) for path in dict.fromkeys(models)}
    try:
        base = readers[config["base_model"]]

        def mlp(expert: dict, layer: int, part: str):
            tensor = readers[expert["source_model"]].get(f"model.layers.{layer}.mlp.{part}.weight").float()
            if expert.get("noise_scale") is not None:
                tensor = tensor + torch.randn(tensor.shape, generator=noise) * expert["noise_scale"]
            if part == "down_proj" and expert.get("residual_scale") is not None:
                tensor = tensor * expert["residual_scale"]
            return tensor

        experts = config["experts"] + config["shared_experts"]

        def tensor_for(name: str, shape):
            return moe_tensor(name, shape, base, lambda i, layer, part: mlp(experts[i], layer, part), gates, n, where)

        with atomic_output(Path(output), overwrite=overwrite, inputs=models) as tmp:
            writer = ModelWriter(tmp, entries)
            try:
                for name, shape, _ in entries:
                    value = tensor_for(name, shape)
                    if tuple(value.shape) != tuple(shape):
                        raise InputError(f"{where}: {name!r} would be {list(value.shape)}, the output needs {list(shape)}")
                    writer.write(name, value.to(dtype).contiguous())
                writer.finish()
            finally:
                writer.close()
            out_cfg.save_pretrained(str(tmp))
            if tokenizer is None and _has_tokenizer(config["base_model"]):
                tokenizer = transformers.AutoTokenizer.from_pretrained(config["base_model"])
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            recipe = {k: v for k, v in config.items() if k != "where"}
            write_model_card(tmp, {"method": f"moe ({config['output']})", "moe": recipe, "seed": seed})
    finally:
        for reader in readers.values():
            reader.close()
    return Path(output)


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


@click.command("moe")
@click.argument("config_path", metavar="CONFIG.yml")
@click.option("--output", "-o", required=True, metavar="DIR", help="The MoE model folder to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of random gates and expert noise.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def moe_command(config_path, output, seed, overwrite):
    """Assemble a Mixtral or Qwen2-MoE model from dense experts (mergekit-moe's config format).

    \b
      fuse moe moe.yml --output my-moe/
    """
    config = read_config(config_path)
    out = build(config, output, seed=seed, overwrite=overwrite)
    click.echo(f"{config['output']}: {len(config['experts'])} experts ({config['gate_mode']} gates) → {out}", err=True)
