"""Hugging Face model pools: a base and named fine-tuned models (hub ids, local folders, LoRA adapters).

Nothing is loaded when a pool is built or validated: :meth:`HFModelPool.validate` reads
``config.json`` files only, and hub ids that are not in the local cache are reported as
"would fetch".  :meth:`HFModelPool.reader` streams tensors straight from the safetensors
files of local (or cached) folders, under the names of the model the pool builds, so
data-free methods merge tensor by tensor as ``fuse merge`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

from fusion_core import ConfigError, InputError, ModelPool, did_you_mean, make_config, option, positive

from .architectures import AUTO_CLASSES, TASKS, describe_signature, signature, signature_difference
from .sources import REMOTE, Location, ModelSource, parse_entry

Entry = str | dict[str, Any]
DTYPES = Literal["auto", "float32", "float16", "bfloat16"]

ENTRY_HELP = "a hub id ('org/name'), a local folder, or {path, revision, subfolder}"


@attrs.frozen
class HFPoolFields:
    """Fields every Hugging Face pool has."""

    base: Entry | None = option(None, help=f"The base (pretrained) model: {ENTRY_HELP}.")
    models: dict[str, Entry] = option(factory=dict, help=f"Fine-tuned models {{name: entry}}; an entry is {ENTRY_HELP}, "
                                      "or {adapter: folder-or-id} for a LoRA/PEFT adapter merged into the base on load.")
    processor: Entry | None = option(None, help="Where the processor/tokenizer saved with the merged model comes from (default: the base).")
    dtype: DTYPES | None = option(None, help="dtype to load weights in (default: transformers' default).")
    trust_remote_code: bool = option(False, help="Run model code shipped with a checkpoint (off: only transformers' own classes).")
    allow_pickle: bool = option(False, help="Allow pickle weights (pytorch_model.bin); only for files you trust.")
    cache_dir: str | None = option(None, help="Hugging Face hub cache folder (default: HF_HOME's).")
    stream: bool = option(True, help="Let data-free methods read tensors lazily from safetensors files (false: load whole models).")


@attrs.frozen
class DataPoolFields(HFPoolFields):
    """Fields of pools whose models can read data (image and sequence classifiers, causal LMs): see :mod:`fusion_hf.pool_data`."""

    datasets: dict[str, dict[str, Any]] = option(
        factory=dict, help="Data for data-driven methods {model name: {dataset, splits, config, data_files, max_samples, <columns>}}; "
        "splits maps the protocol's train/val/test to the dataset's splits (default {train: train, val: validation, test: test}).")
    batch_size: int = option(32, help="Examples per batch of that data.", validator=positive)
    max_length: int = option(128, help="Truncate text inputs of that data to this many tokens (causal LMs: the length of each calibration window).", validator=positive)


@attrs.frozen
class HFPoolConfig(DataPoolFields):
    auto_class: Literal[AUTO_CLASSES] = option("AutoModel", help="The transformers class that loads the models (a fixed allowlist).")  # type: ignore[valid-type]
    task: Literal[tuple(TASKS)] | None = option(None, help="Shortcut choosing auto_class by task (e.g. causal-lm, seq2seq, clip-vision).")  # type: ignore[valid-type]


@attrs.frozen
class SeqClassificationPoolConfig(DataPoolFields):
    per_task_heads: bool = option(True, help="Keep each model's classification head out of the merge and evaluate each task with its own head.")


class HFModelPool(ModelPool):
    """Transformers models from hub ids or local folders, loaded lazily with a chosen auto class."""

    name = "hf"
    summary = "Hugging Face models (hub ids or local folders, LoRA adapters) loaded lazily by an allowlisted auto class."
    Config = HFPoolConfig
    reference_url = "https://huggingface.co/docs/transformers/model_doc/auto"
    fixed_class: ClassVar[str | None] = None

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        cfg = self.config
        self._base = parse_entry("base", cfg.base) if cfg.base is not None else None
        if self._base is not None and self._base.adapter:
            raise ConfigError("base: the base model cannot be an adapter; adapters go under models")
        self._models = {name: parse_entry(f"model {name!r}", value) for name, value in cfg.models.items()}
        self._processor = parse_entry("processor", cfg.processor) if cfg.processor is not None else None
        self._locations: dict[str | None, Location] = {}
        self._data_specs = self._parse_datasets(getattr(cfg, "datasets", None) or {})
        self._data: dict[tuple[str, str], Any] = {}
        self._encoder_parts: dict[str, Any] = {}

    def _parse_datasets(self, raw: Mapping[str, Any]) -> dict:
        from .pool_data import ModelDataFields

        specs = {}
        for name, fields in raw.items():
            if name not in self._models:
                raise ConfigError(f"modelpool.datasets: {name!r} is not a model of the pool{did_you_mean(str(name), self._models)}; "
                                  "datasets are keyed by model (= task) name")
            if not isinstance(fields, Mapping):
                raise ConfigError(f"modelpool.datasets.{name}: expected a mapping {{dataset, splits, ...}}, got {fields!r}")
            specs[name] = make_config(ModelDataFields, fields, where=f"modelpool.datasets.{name}")
        return specs

    # ------------------------------------------------------------------ names and sources

    @property
    def auto_class(self) -> str:
        if self.fixed_class is not None:
            return self.fixed_class
        cfg = self.config
        if cfg.task is not None:
            chosen = TASKS[cfg.task]
            if cfg.auto_class not in ("AutoModel", chosen):
                raise ConfigError(f"modelpool: task {cfg.task!r} means auto_class {chosen!r}, but auto_class is {cfg.auto_class!r}; give one of them")
            return chosen
        return cfg.auto_class

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    @property
    def has_base(self) -> bool:
        return self._base is not None

    def source(self, name: str | None) -> ModelSource:
        if name is None:
            if self._base is None:
                raise InputError(f"model pool {self.name!r} has no base model; set modelpool.base")
            return self._base
        try:
            return self._models[name]
        except KeyError:
            raise InputError(f"model pool {self.name!r} has no model {name!r}{did_you_mean(name, self._models)}") from None

    def location(self, name: str | None) -> Location:
        if name not in self._locations:
            self._locations[name] = self.source(name).locate(self.config.cache_dir)
        return self._locations[name]

    def _options(self):
        from .loading import LoadOptions

        cfg = self.config
        return LoadOptions(trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, cache_dir=cfg.cache_dir, dtype=cfg.dtype)

    # ------------------------------------------------------------------ dry-run checks

    def validate(self) -> None:
        """Local paths exist, configs are readable, weights are safetensors, architectures agree; no network."""
        _ = self.auto_class
        if not self._models:
            raise ConfigError(f"model pool {self.name!r} has no models; set modelpool.models={{name: entry, ...}}")
        reference: tuple[str, dict] | None = None
        entries = ([(None, self._base)] if self._base is not None else []) + list(self._models.items())
        code: dict[str, list[str]] = {}
        for name, source in entries:
            loc = self.location(name)
            data = loc.read_config()
            if self.config.trust_remote_code:
                from .loading import remote_code

                if found := remote_code(loc, data):
                    code[source.label] = found
            if source.adapter:
                self._validate_adapter(source, loc, data)
                continue
            loc.check_weights(self.config.allow_pickle)
            if data is None:
                continue
            sig = signature(data, self.auto_class)
            if reference is None:
                reference = (source.label, sig)
                continue
            diff = signature_difference(reference[1], sig)
            if diff:
                raise InputError(f"architectures differ across the pool: {reference[0]} is {describe_signature(reference[1])} but "
                                 f"{source.label} is {describe_signature(sig)} (differs in {', '.join(diff)}); all models must share one architecture")
        if self._processor is not None:
            self._processor.locate(self.config.cache_dir)
        self._check_datasets()
        if self.config.trust_remote_code:
            from .loading import warn_remote_code

            warn_remote_code(self.name, code)

    def _validate_adapter(self, source: ModelSource, loc: Location, data: dict | None) -> None:
        from .adapters import PEFT_MISSING, check_recorded_base, peft_available

        if not peft_available():
            raise InputError(PEFT_MISSING.format(label=source.label))
        if data is not None:
            check_recorded_base(source, data, self._base)
        elif self._base is None:
            check_recorded_base(source, {}, None)

    def describe(self) -> dict:
        out: dict[str, Any] = {"auto_class": self.auto_class}
        fetch = []
        if self._base is not None:
            loc = self.location(None)
            out["base"] = loc.describe()
            if loc.kind == REMOTE:
                fetch.append(f"{self._base.path}@{self._base.revision or 'main'}")
        models = {}
        for name, source in self._models.items():
            loc = self.location(name)
            models[name] = ("adapter " if source.adapter else "") + loc.describe()
            if loc.kind == REMOTE:
                fetch.append(f"{source.path}@{source.revision or 'main'}")
        out["models"] = models
        if fetch:
            out["would_fetch"] = fetch
        return out

    def inputs(self) -> dict[str, str]:
        """``{name: spec}`` of every input with its revision, for model cards."""
        out = {"base": self._base.spec()} if self._base is not None else {}
        out.update({name: ("adapter " if s.adapter else "") + s.spec() for name, s in self._models.items()})
        return out

    # ------------------------------------------------------------------ loading

    def model_class(self):
        from .architectures import model_class

        return model_class(self.auto_class)

    def load_model(self, name: str | None = None):
        """A fresh ``nn.Module`` of model ``name`` (``None``: the base), in eval mode."""
        from .loading import load_pretrained

        source = self.source(name)
        if source.adapter:
            from .adapters import merge_adapter

            base = self.load_model(None)
            return merge_adapter(base, source, self.location(name).folder, self.config.allow_pickle)
        model = load_pretrained(self.model_class(), self.location(name), self._options())
        return self._after_load(model, name)

    def _after_load(self, model, name: str | None):
        return model

    def _meta(self, name: str | None):
        from .loading import load_config, meta_model

        return meta_model(self.model_class(), load_config(self.location(name), self._options()), self.config.trust_remote_code)

    def _keep_key(self, meta):
        return None

    def reader(self, name: str | None = None):
        """Lazy tensors of model ``name`` under the model's own names (streamed from safetensors when possible)."""
        from fusion_core import ShardedReader, StateDictReader

        label = "base" if name is None else str(name)
        source, loc = self.source(name), self.location(name)
        if self.config.stream and not source.adapter and loc.folder is not None:
            safes, _ = loc.weight_files()
            if safes:
                from .keymap import MappedReader, checkpoint_key_map

                meta = self._meta(name)
                inner = ShardedReader(loc.folder, label=label)
                mapping = checkpoint_key_map(meta, inner.keys())
                if mapping and _covers(mapping, meta):
                    return MappedReader(inner, mapping, label=label, keep=self._keep_key(meta))
                inner.close()
        model = self.load_model(name)
        keep = self._keep_key(model)
        state = {k: v for k, v in model.state_dict().items() if keep is None or keep(k)}
        return StateDictReader(state, label=label)

    def model_from_state_dict(self, state_dict: Mapping[str, Any]):
        """The base architecture holding the merged tensors (tied and unmerged tensors keep the base's values)."""
        model = self.load_model(None) if self.has_base else self.load_model(self.model_names[0])
        expected = model.state_dict()
        unexpected = [k for k in state_dict if k not in expected]
        if unexpected:
            raise InputError(f"merged state dict has tensors the model lacks: {', '.join(unexpected[:5])}")
        bad = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            raise InputError(f"merged tensor {bad[0]!r} has shape {list(state_dict[bad[0]].shape)}, the model expects {list(expected[bad[0]].shape)}")
        model.load_state_dict(dict(state_dict), strict=False)
        return self._after_merge(model)

    def _after_merge(self, model):
        return model

    # ------------------------------------------------------------------ data for data-driven methods (fusion_core.adapters)

    def input_kind(self) -> str:
        """``"image"`` or ``"text"``: what the pool's models read; a ConfigError for classes that read no data here."""
        from .pool_data import IMAGE_CLASSES, LM_CLASSES, TEXT_CLASSES, input_kind

        kind = input_kind(self.auto_class)
        if kind is None:
            raise ConfigError(f"model pool {self.name!r}: datasets are read for image models ({', '.join(IMAGE_CLASSES)}), "
                              f"sequence classifiers ({', '.join(TEXT_CLASSES)}) and causal LMs ({', '.join(LM_CLASSES)}), "
                              f"not for {self.auto_class}; remove modelpool.datasets")
        return kind

    def _check_datasets(self) -> None:
        """Dry-run checks of ``datasets``: the class reads data, paths exist, explicitly mapped splits and columns exist."""
        from pathlib import Path

        from .data import BUILDERS, _is_local, check_dataset

        if not self._data_specs:
            return
        kind = self.input_kind()
        for name, spec in self._data_specs.items():
            if spec.splits is not None:
                for split in spec.splits:
                    check_dataset(spec.for_split(split), f"model {name!r} ({split} data)", spec.columns(kind))
            elif spec.dataset not in BUILDERS and _is_local(spec.dataset) and not Path(spec.dataset).expanduser().exists():
                raise InputError(f"modelpool.datasets.{name}: local dataset path not found: {spec.dataset}")

    def data(self, name: str, split: str):
        """Labelled batches ``(inputs, labels)`` of model ``name``'s dataset for ``split`` (``None``: none configured).

        ``split`` is a protocol split (``train``, ``val``, ``test``), mapped to the dataset's own
        split by ``datasets.<name>.splits``.  Re-iterable; the dataset loads on first use.
        """
        from .batches import EncodedBatches
        from .data import check_columns, check_dataset, describe_dataset, load_split

        spec = self._data_specs.get(name)
        fields = spec.for_split(split) if spec is not None else None
        if fields is None:
            return None
        key = (name, split)
        if key not in self._data:
            kind = self.input_kind()
            label = f"model {name!r} ({split} data)"
            columns = spec.columns(kind)
            check_dataset(fields, label, columns)

            def load():
                ds = load_split(fields, label, cache_dir=self.config.cache_dir)
                check_columns(ds, label, columns, describe_dataset(fields))
                return ds

            labels = None if kind == "lm" else spec.label_column  # causal LMs: plain text (calibration inputs)
            self._data[key] = EncodedBatches(load, self._encoder(spec, kind), self.config.batch_size, labels)
        return self._data[key]

    def _preprocessing_source(self) -> ModelSource:
        """Where the image processor / tokenizer of the data comes from: ``processor``, else the base, else the first model."""
        if self._processor is not None:
            return self._processor
        if self._base is not None:
            return self._base
        return next(iter(self._models.values()))

    def image_processor(self):
        if "image" not in self._encoder_parts:
            from .batches import load_image_processor

            source = self._preprocessing_source()
            self._encoder_parts["image"] = load_image_processor(source.locate(self.config.cache_dir), self._options(), source.label)
        return self._encoder_parts["image"]

    def tokenizer(self):
        if "text" not in self._encoder_parts:
            from .task_pools.text_classification import load_tokenizer

            self._encoder_parts["text"] = load_tokenizer(self._preprocessing_source(), self.config.cache_dir,
                                                         trust_remote_code=self.config.trust_remote_code)
        return self._encoder_parts["text"]

    def _encoder(self, spec, kind: str):
        from .batches import ImageEncoder, TextEncoder, TokenWindows

        if kind == "image":
            return ImageEncoder(self.image_processor(), spec.image_column)
        if kind == "lm":
            return TokenWindows(self.tokenizer(), spec.text_column, self.config.max_length)
        return TextEncoder(self.tokenizer(), spec.text_column, spec.text_pair_column, self.config.max_length)

    def forward(self, model: Any, inputs: Any) -> Any:
        """``model(**inputs)`` (a full CLIPModel given images: its image features); decoder classifiers get a pad id first."""
        from .forward import hf_forward

        if isinstance(inputs, Mapping) and "input_ids" in inputs:
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "pad_token_id", 0) is None:
                from .task_pools.text_classification import pad_for_model

                pad_for_model(model, self.tokenizer())
        return hf_forward(model, inputs)

    # ------------------------------------------------------------------ saving

    def processor_location(self) -> Location | None:
        if self._processor is not None:
            return self._processor.locate(self.config.cache_dir)
        if self._base is not None:
            return self.location(None)
        return None

    def save_model(self, model: Any, path: str, *, recipe: Mapping[str, Any]) -> None:
        """``save_pretrained`` (safetensors) + processor/tokenizer + README recipe, written atomically."""
        from .loading import load_processor
        from .saving import build_recipe, save_model_folder

        if isinstance(model, Mapping):
            model = self.model_from_state_dict(model)
        loc = self.processor_location()
        processor = load_processor(loc, self._options()) if loc is not None else None
        card = build_recipe(recipe, self.inputs())
        save_model_folder(model, path, recipe=card, base=self._base.spec() if self._base else None, processor=processor)


def _covers(mapping: dict[str, str], meta) -> bool:
    """The checkpoint provides every parameter of the model, except tied ones."""
    params = dict(meta.named_parameters(remove_duplicate=False))
    unique = {id(p) for name, p in meta.named_parameters()}
    seen: set[int] = set()
    for name, p in params.items():
        if name in mapping:
            seen.add(id(p))
    return unique <= seen


class CLIPVisionPool(HFModelPool):
    """CLIP vision encoders (``CLIPVisionModel``); a full CLIP base checkpoint works, its vision tower is used."""

    name = "hf_clip_vision"
    summary = "CLIP vision encoders (hub ids or folders; a full CLIP base works) with their processor, as in FusionBench."
    Config = DataPoolFields
    fixed_class = "CLIPVisionModel"
    reference_url = "https://huggingface.co/docs/transformers/model_doc/clip"


class CausalLMPool(HFModelPool):
    """Causal language models (``AutoModelForCausalLM``) with their tokenizer."""

    name = "hf_causal_lm"
    summary = "Causal language models (AutoModelForCausalLM) with their tokenizer; LoRA adapters merge into the base."
    Config = DataPoolFields  # datasets: plain text, read as windows of max_length tokens (calibration of pruning)
    fixed_class = "AutoModelForCausalLM"


class Seq2SeqPool(HFModelPool):
    """Encoder-decoder models (``AutoModelForSeq2SeqLM``, e.g. Flan-T5) with their tokenizer."""

    name = "hf_seq2seq"
    summary = "Encoder-decoder models (AutoModelForSeq2SeqLM, e.g. Flan-T5) with their tokenizer."
    Config = HFPoolFields
    fixed_class = "AutoModelForSeq2SeqLM"


class SeqClassificationPool(HFModelPool):
    """Sequence classifiers; with ``per_task_heads`` only backbones merge and each task keeps its own head."""

    name = "hf_seq_classification"
    summary = "Sequence classifiers (AutoModelForSequenceClassification); backbones merge, each task keeps its own head."
    Config = SeqClassificationPoolConfig
    fixed_class = "AutoModelForSequenceClassification"

    def _keep_key(self, model):
        if not self.config.per_task_heads:
            return None
        from .heads import is_backbone_key

        prefix = getattr(model, "base_model_prefix", None)
        return lambda key: is_backbone_key(key, prefix)

    def head_state(self, name: str) -> dict:
        """The classification head tensors of model ``name``."""
        from .heads import is_backbone_key

        model = self.load_model(name)
        prefix = model.base_model_prefix
        return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_backbone_key(k, prefix)}

    def _with_heads(self, model):
        if self.config.per_task_heads:
            from .heads import attach

            attach(model, {name: self.head_state(name) for name in self.model_names})
        return model

    def load_model(self, name: str | None = None):
        model = super().load_model(name)
        return self._with_heads(model) if name is None else model

    def _after_merge(self, model):
        return model  # load_model(None) attached the heads already


POOLS = [HFModelPool, CLIPVisionPool, CausalLMPool, Seq2SeqPool, SeqClassificationPool]
