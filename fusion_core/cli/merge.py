"""``fuse merge``: merge checkpoints on disk into a new checkpoint, streaming tensor by tensor."""

from __future__ import annotations

import contextlib
import time

import attrs
import click

from ..errors import ConfigError, FuseError


class MergeInterrupted(FuseError):
    """Ctrl-C during a merge (the partial output has been removed)."""

    exit_code = 130


def _parse_sets(sets: tuple[str, ...]) -> dict:
    from ..config import parse_value, refuse_repeated_keys

    refuse_repeated_keys(sets, what="--set")
    fields = {}
    for item in sets:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"malformed --set {item!r}: expected FIELD=VALUE (e.g. --set density=0.2)")
        if key.startswith("method."):
            key = key[len("method.") :]
        if "." in key:
            raise ConfigError(
                f"malformed --set {item!r}: FIELD is one of the method's config fields (e.g. density), without dots"
            )
        fields[key] = parse_value(raw)
    return fields


def _split_recipe(text: str) -> tuple[str, str]:
    fmt, colon, file = text.partition(":")
    if not colon or not fmt or not file:
        raise ConfigError(f"malformed --recipe {text!r}: expected FORMAT:FILE (e.g. --recipe mergekit:recipe.yml)")
    return fmt, file


def _merge_imported(pm, fmt, file, output, allow_pickle, dtype, start, quiet, options_for) -> None:
    """``fuse merge`` of a foreign recipe: the format's plugin builds the method and opens the inputs."""
    from ..engine.stream import merge_to_path
    from ..recipes import import_recipe

    imported = import_recipe(pm, fmt, file, allow_pickle=allow_pickle)
    try:
        out_dtype = dtype or imported.out_dtype
        recipe = dict(imported.record)
        recipe.setdefault("dtype", out_dtype or "same as the base")
        options = options_for(recipe, out_dtype, imported.finish)
        try:
            out = merge_to_path(imported.method, imported.base, imported.models, output, options)
        except KeyboardInterrupt as exc:
            raise _stopped(exc, output) from None
    finally:
        for reader in ([imported.base] if imported.base is not None else []) + list(imported.models):
            reader.close()
        if imported.close is not None:
            imported.close()
    if not quiet:
        name = getattr(imported.method, "name", fmt)
        n_inputs = len(imported.models) + (1 if imported.base is not None else 0)
        click.echo(f"{name} ({fmt} recipe): {n_inputs} input(s) → {out} in {time.perf_counter() - start:.1f} s", err=True)


def _dist_version(dist: str | None) -> str | None:
    if not dist:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@attrs.define
class MergeSpec:
    """What to merge: the method, its fields and the inputs (from the flags)."""

    method: str
    fields: dict
    base: str | None
    models: list[str]
    dtype: str | None


def _spec_from_flags(method, base, models, sets, dtype) -> MergeSpec:
    if not method:
        raise ConfigError(
            "missing METHOD, e.g. `fuse merge ties --base B --model M1 --model M2 -o OUT` (`fuse list methods` shows them)"
        )
    return MergeSpec(method, _parse_sets(sets), base, list(models), dtype)


def _make_method(ctx: click.Context, spec: MergeSpec):
    """The registry entry, the validated config and the method instance; refuses what cannot stream."""
    from ..config import make_config
    from ..engine.protocol import Passthrough, streams

    entry = ctx.obj.registry.get("method", spec.method)
    config = make_config(entry.cls.Config, spec.fields, where=f"method {spec.method}")
    instance = entry.cls(config)
    if not streams(instance):
        raise ConfigError(
            f"method {spec.method!r} is not a per-tensor method, so fuse merge cannot stream it; run it with `fuse run method={spec.method}`"
        )
    if not spec.models and not (spec.base and isinstance(instance, Passthrough)):
        raise ConfigError("no models to merge: give --model PATH (once per fine-tuned model)")
    return entry, config, instance


@contextlib.contextmanager
def _open_inputs(spec: MergeSpec, allow_pickle: bool):
    """``(base reader or None, model readers)``, all closed on exit."""
    from ..engine.readers import open_reader

    readers = []
    try:
        base_reader = open_reader(spec.base, allow_pickle=allow_pickle, label=str(spec.base)) if spec.base else None
        if base_reader is not None:
            readers.append(base_reader)
        for path in spec.models:
            readers.append(open_reader(path, allow_pickle=allow_pickle, label=str(path)))
        yield base_reader, readers[1:] if base_reader is not None else readers
    finally:
        for reader in readers:
            reader.close()


def _recipe(spec: MergeSpec, entry, config, seed: int, compute_dtype: str) -> dict:
    """What the model card records."""
    from ..config import config_to_dict

    recipe = {
        "method": spec.method,
        "fields": config_to_dict(config),
        "base": spec.base,
        "models": list(spec.models),
        "seed": seed,
        "dtype": spec.dtype or ("same as the base" if spec.base else "same as the inputs"),
        "compute_dtype": compute_dtype,
    }
    if entry.dist:
        recipe["plugin"] = f"{entry.dist} {_dist_version(entry.dist) or ''}".strip()
    return recipe


@click.command("merge")
@click.argument("method", required=False)
@click.option("--base", metavar="PATH", help="The base (pretrained) model: a .safetensors file or an HF folder.")
@click.option("--model", "models", metavar="PATH", multiple=True, help="A fine-tuned model (repeat for each).")
@click.option("--output", "-o", metavar="PATH", required=True, help="A .safetensors file, or else an HF model folder.")
@click.option("--set", "sets", metavar="FIELD=VALUE", multiple=True, help="A method field, e.g. --set density=0.2 (repeat).")
@click.option("--mergekit-config", metavar="FILE", help="Read method, models and parameters from a mergekit YAML instead.")
@click.option("--recipe", "recipe_file", metavar="FORMAT:FILE", help="Read a recipe of a registered format (--mergekit-config F = --recipe mergekit:F).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-tensor generators (random methods).")
@click.option("--dtype", metavar="DTYPE", help="Output dtype of float tensors (default: the base's).")
@click.option("--compute-dtype", metavar="DTYPE", default="float32", show_default=True, help="Dtype the kernels compute in.")
@click.option("--device", default="cpu", show_default=True, help="Where kernels compute: cpu or cuda.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output that fuse wrote (never anything else).")
@click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt pickle checkpoints (torch.load weights_only); only for trusted files."
)
@click.option("--common-keys-only", is_flag=True, help="Merge only the tensors every model has (instead of an error).")
@click.option("--allow-duplicates", is_flag=True, help="Accept the same model (path or weights) given twice.")
@click.option("--copy-code", is_flag=True, help="Also copy the base folder's code files (*.py) into the output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary line.")
@click.pass_context
def merge_command(
    ctx,
    method,
    base,
    models,
    output,
    sets,
    mergekit_config,
    recipe_file,
    seed,
    dtype,
    compute_dtype,
    device,
    shard_size,
    overwrite,
    allow_pickle,
    common_keys_only,
    allow_duplicates,
    copy_code,
    quiet,
):
    """Merge checkpoints with METHOD into OUTPUT, one tensor at a time.

    \b
      fuse merge task_arithmetic --base base/ --model a/ --model b/ --set scaling_factor=0.3 -o out/
      fuse merge ties --base base/ --model a/ --model b/ --set density=0.2 -o merged.safetensors
      fuse merge simple_average --model a.safetensors --model b.safetensors -o avg.safetensors
      fuse merge --mergekit-config ties.yaml -o out/

    Inputs are .safetensors files or HF folders (sharded or not); an output ending in
    .safetensors is one file, anything else an HF folder with the base's config and
    tokenizer files and a model card recording the recipe.  --overwrite replaces only
    an output fuse wrote; inputs, folders holding them and the working directory are refused.
    """
    from ..cleanup import terminate_as_interrupt
    from ..config import SEED_MAX, check_device, summarize
    from ..engine.stream import MergeOptions

    def options_for(recipe: dict, out_dtype: str | None, finish=None, inputs=()) -> MergeOptions:
        return MergeOptions(
            seed=seed,
            compute_dtype=compute_dtype,
            out_dtype=out_dtype,
            device=device,
            shard_size=shard_size,
            common_keys_only=common_keys_only,
            overwrite=overwrite,
            recipe=recipe,
            progress=not quiet,
            finish=finish,
            copy_code=copy_code,
            inputs=tuple(inputs),
        )

    start = time.perf_counter()
    check_device(device, what="--device")
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed must be in [0, 2**63 - 1], got {summarize(seed)}")
    with terminate_as_interrupt():
        if mergekit_config or recipe_file:
            if method or base or models or sets:
                raise ConfigError("give either a recipe (--mergekit-config/--recipe) or METHOD with --base/--model/--set, not both")
            if mergekit_config and recipe_file:
                raise ConfigError("give one of --mergekit-config and --recipe")
            fmt, file = ("mergekit", mergekit_config) if mergekit_config else _split_recipe(recipe_file)
            _merge_imported(ctx.obj.pm, fmt, file, output, allow_pickle, dtype, start, quiet, options_for)
            return
        spec = _spec_from_flags(method, base, models, sets, dtype)
        entry, config, instance = _make_method(ctx, spec)
        out = _merge_spec(spec, instance, output, options_for(_recipe(spec, entry, config, seed, compute_dtype), spec.dtype),
                          allow_pickle=allow_pickle, allow_duplicates=allow_duplicates)  # fmt: skip
    if not quiet:
        n_inputs = len(spec.models) + (1 if spec.base else 0)
        click.echo(f"{spec.method}: {n_inputs} input(s) → {out} in {time.perf_counter() - start:.1f} s", err=True)


def _merge_spec(spec: MergeSpec, instance, output: str, options, *, allow_pickle: bool, allow_duplicates: bool):
    """Check the output against the inputs (before anything is read), open them, refuse duplicates, merge."""
    from ..engine.duplicates import check_duplicates
    from ..engine.protocol import Passthrough
    from ..engine.stream import merge_to_path
    from ..output import check_output_path

    inputs = [p for p in [spec.base, *spec.models] if p]
    check_output_path(output, overwrite=options.overwrite, inputs=inputs)
    with _open_inputs(spec, allow_pickle) as (base_reader, model_readers):
        if not allow_duplicates and not isinstance(instance, Passthrough):
            check_duplicates(spec.models, model_readers)
        try:
            return merge_to_path(instance, base_reader, model_readers, output, attrs.evolve(options, inputs=tuple(inputs)))
        except KeyboardInterrupt as exc:
            raise _stopped(exc, output) from None


def _stopped(exc: BaseException, output: str) -> MergeInterrupted:
    """Ctrl-C (exit 130) or SIGTERM (exit 143), after the partial output was removed."""
    from ..cleanup import Terminated

    if isinstance(exc, Terminated):
        error = MergeInterrupted(f"terminated (SIGTERM): nothing was written to {output}")
        error.exit_code = 143
        return error
    return MergeInterrupted(f"interrupted: nothing was written to {output}")
