"""`codi train`: CoDi distillation of a Stable Diffusion model into a few-step conditional
generator. The flags are the seed's (`train_codi_flax.py`), with underscores as in its README
and kebab-case twins. Each training option is a `TrainConfig` field, where its type, default,
help and panel are defined (`training_options()`); this module adds only the flags of how to
run (`_cli_only`: a dry run, multi-host, the compilation cache)."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer

from codi_eqx.train._config import PANEL_RUN, flag_spellings, training_options

from ._common import (
    COMPILATION_CACHE_DIR_HELP,
    NO_COMPILATION_CACHE_HELP,
    CodiUsageError,
    fail,
    note,
    progress,
    reported_errors,
    use_compilation_cache,
)

_CACHE = "Compilation cache"
_MULTI_HOST = "Multi-host"


def _cli_only(
    dry_run: Annotated[bool, typer.Option(
        *flag_spellings("dry_run"), help="Check the flags, model folder and dataset, print "
        "the resolved configuration as JSON, and stop.", rich_help_panel=PANEL_RUN)] = False,
    distributed: Annotated[bool, typer.Option(
        *flag_spellings("distributed"), help="Multi-host run: start jax.distributed with the "
        "cluster detected from the environment (TPU pods, SLURM, ...). Each process reads its "
        "share of every global batch; only process 0 writes.",
        rich_help_panel=_MULTI_HOST)] = False,
    coordinator_address: Annotated[str | None, typer.Option(
        *flag_spellings("coordinator_address"), help="Multi-host run with an explicit "
        "coordinator HOST:PORT (with --num_processes and --process_id).",
        rich_help_panel=_MULTI_HOST)] = None,
    num_processes: Annotated[int | None, typer.Option(
        *flag_spellings("num_processes"), help="Number of processes of an explicit multi-host "
        "run.", rich_help_panel=_MULTI_HOST, min=1)] = None,
    process_id: Annotated[int | None, typer.Option(
        *flag_spellings("process_id"), help="This process's index in an explicit multi-host "
        "run.", rich_help_panel=_MULTI_HOST, min=0)] = None,
    compilation_cache_dir: Annotated[Path | None, typer.Option(
        *flag_spellings("compilation_cache_dir"), help=COMPILATION_CACHE_DIR_HELP,
        rich_help_panel=_CACHE)] = None,
    no_compilation_cache: Annotated[bool, typer.Option(
        *flag_spellings("no_compilation_cache"), help=NO_COMPILATION_CACHE_HELP,
        rich_help_panel=_CACHE)] = False,
) -> None:
    """The flags of `codi train` that are not training options (`TrainConfig` fields): how
    to run (a dry run, multi-host, the compilation cache). Only its signature is used."""


CLI_ONLY = tuple(inspect.signature(_cli_only, eval_str=True).parameters)
"""The names of the flags that `TrainConfig` does not have."""


def _cli_type(tp):
    """A `TrainConfig` field's type as Typer reads it: a repeatable option (`tuple[str, ...]`)
    is a list."""
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def _option_parameter(opt) -> inspect.Parameter:
    """The Typer parameter of one training option (a `TrainOption`)."""
    default = list(opt.default) if isinstance(opt.default, tuple) else opt.default
    return inspect.Parameter(
        opt.name, inspect.Parameter.KEYWORD_ONLY, default=default,
        annotation=Annotated[_cli_type(opt.type), typer.Option(
            *opt.flags, help=opt.help, rich_help_panel=opt.panel)])


def _signature() -> inspect.Signature:
    """`ctx`, every `TrainConfig` field (`training_options()`), then the flags of
    `_cli_only`."""
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            annotation=typer.Context)
    cli_only = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                for p in inspect.signature(_cli_only, eval_str=True).parameters.values()]
    return inspect.Signature([ctx, *map(_option_parameter, training_options()), *cli_only],
                             return_annotation=None)


def train(ctx: typer.Context, **values) -> None:
    """Distil a Stable Diffusion model with CoDi into a few-step conditional generator.

    The seed README's commands run as they stand (with `codi train` for the script and local
    paths). Ctrl-C or SIGTERM writes a checkpoint and stops; resume with
    --resume_from_checkpoint latest.
    """
    given = _given_on_the_command_line(ctx, values)
    cli = {name: values.pop(name) for name in CLI_ONLY}
    for name, value in values.items():  # repeatable options arrive as lists
        if isinstance(value, list):
            values[name] = tuple(value)
    explicit = (cli["coordinator_address"], cli["num_processes"], cli["process_id"])
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        fail("--coordinator_address, --num_processes and --process_id go together", 2)
    if not cli["dry_run"]:  # before anything compiles
        use_compilation_cache(cli["compilation_cache_dir"], cli["no_compilation_cache"])
    if cli["distributed"] or cli["coordinator_address"] is not None:
        from codi_eqx.parallel import initialize_distributed

        try:
            initialize_distributed(*explicit, cpu_collectives="gloo")
        except Exception as e:  # the cluster could not be joined
            fail(f"cannot start jax.distributed: {str(e).splitlines()[0]}", 1)
    with reported_errors():
        _run(values, cli["dry_run"], given)


# Typer reads the command's parameters from its signature: the training options come from
# `TrainConfig`'s fields, where each is defined once.
train.__signature__ = _signature()


def _builtin_run(values: dict, given: set[str]) -> dict:
    """No model and no data: distil the built-in shapes teacher on freshly drawn shapes,
    with the built-in run's defaults for every option not given."""
    from codi_eqx.toy import TOY_TRAIN_DEFAULTS, BuiltinMissingError, prepare_builtin_run

    values = dict(values)
    for name, value in TOY_TRAIN_DEFAULTS.items():
        if name not in given:
            values[name] = value
    try:
        with progress(transient=True) as bar:
            bar.add_task("drawing shapes", total=None, info="")
            values.update(prepare_builtin_run(values["output_dir"], seed=values["seed"]))
    except BuiltinMissingError as e:
        raise CodiUsageError(f"{e}; or give --pretrained_model_name_or_path and data") from None
    note(f"no model or data given: distilling the built-in shapes teacher on "
         f"{values['train_data_dir']} ({values['max_train_steps']} steps of batch "
         f"{values['train_batch_size']} at {values['resolution']}px)")
    return values


def _given_on_the_command_line(ctx: typer.Context, values: dict) -> set[str]:
    """The options the user set (on the command line or through the environment)."""
    given = set()
    for name in values:
        try:
            source = ctx.get_parameter_source(name)
        except Exception:  # not a parameter of this command
            continue
        # By name: Typer may bring its own copy of click's ParameterSource enum.
        if getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return given


def _run(values: dict, dry_run: bool, given: set[str] = frozenset()) -> None:
    import json
    import signal

    from codi_eqx.train import TrainConfig, plan, with_model_defaults
    from codi_eqx.train import train as run_training

    # TrainConfigError and CheckpointError (usage), TrainingError and DataError (failures)
    # reach `reported_errors`, which gives each its exit code.
    if not values["pretrained_model_name_or_path"] and not (
            values["train_data_dir"] or values["dataset_name"]):
        values = _builtin_run(values, given)
    config = with_model_defaults(TrainConfig(**values))
    p = plan(config)  # every check that needs no weights, before the progress bar starts
    if dry_run:
        for line in p.notes:
            note(line)
        print(json.dumps(p.describe(config), indent=2))
        return
    with progress() as bar:
        summary = run_training(config, progress=bar, checked=p)
    if summary["interrupted"] is not None:
        note(f"interrupted at step {summary['step']}: checkpoint {summary['checkpoint']}; "
             "continue with --resume_from_checkpoint latest")
        raise typer.Exit(130 if summary["interrupted"] == signal.SIGINT else 143)
    note(f"trained {summary['step']} steps (loss {summary['loss']:.4f}); adapter in "
         f"{summary['output_dir']}")
