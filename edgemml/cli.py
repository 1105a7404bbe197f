"""The `edgemml` command line: parse, call, print. One function per command; no logic of its own.

Exit codes (documented in README.md): 0 success, 1 a validation gate failed, 2 user error (config,
missing file, bad input), 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgemml import __version__
from edgemml.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, EdgemmlError

EXIT_INTERRUPTED = 130

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


def _set_option() -> Any:
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a pipeline value, e.g. --set stages.prune.target_macs=0.4 "
                             "(the value is parsed as YAML; repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgemml")
@click.option("--debug", is_flag=True, envvar="EDGEMML_DEBUG",
              help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn a pretrained PyTorch model into a small, fast, verified artifact for CPUs."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@_set_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: runs/<pipeline name>).")
@click.option("--force", is_flag=True, help="Re-run every stage, ignoring the cache.")
@click.option("--from", "from_stage", metavar="NAME", help="Re-run this stage and all after it.")
@click.option("--only", "only_stage", metavar="NAME",
              help="Run only this stage; its inputs are taken from the run directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; warnings and errors only.")
@click.option("--log-json", is_flag=True, help="Print one JSON event per line on stdout.")
def run_command(pipeline: Path, overrides: tuple[str, ...], out_dir: Path | None, force: bool,
                from_stage: str | None, only_stage: str | None, quiet: bool,
                log_json: bool) -> None:
    """Run PIPELINE, skipping stages whose inputs and config did not change."""
    from edgemml.config import load_pipeline
    from edgemml.pipeline import Runner
    from edgemml.progress import JsonReporter, QuietReporter, RichReporter

    if from_stage and only_stage:
        raise click.UsageError("--from and --only cannot be combined")
    loaded = load_pipeline(pipeline, list(overrides))
    reporter = JsonReporter() if log_json else QuietReporter() if quiet else RichReporter()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    runner = Runner(loaded, loaded.run_dir(out_dir), reporter, force=force, from_stage=from_stage,
                    only_stage=only_stage, rank=rank, world_size=world)
    with reporter:
        outcomes = runner.run()
    if not quiet and not log_json:
        ran = sum(o.status == "ran" for o in outcomes)
        cached = sum(o.status == "cached" for o in outcomes)
        _out.print(f"[green]done[/]: {ran} stage(s) ran, {cached} cached; run directory: "
                   f"{runner.run_dir}")
        for line in _highlights(outcomes):
            _out.print(line)


def _highlights(outcomes: list[Any]) -> list[str]:
    """Lines a stage asked to be shown at the end of a run (e.g. where the bundle is)."""
    lines: list[str] = []
    for o in outcomes:
        for text in o.metrics.get("highlights", []):
            lines.append(f"  {o.name}: {text}")
    return lines


@cli.command("check")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@_set_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to compare against (default: runs/<pipeline name>).")
def check_command(pipeline: Path, overrides: tuple[str, ...], out_dir: Path | None) -> None:
    """Validate PIPELINE and print which stages would run and which are cached."""
    from edgemml.config import load_pipeline
    from edgemml.pipeline import Runner
    from edgemml.progress import QuietReporter

    loaded = load_pipeline(pipeline, list(overrides))
    runner = Runner(loaded, loaded.run_dir(out_dir), QuietReporter())
    table = Table(title=f"{loaded.config.name}: {runner.run_dir}")
    for col in ("#", "stage", "type", "reads", "plan", "why"):
        table.add_column(col)
    for item, status, why in runner.dry_plan():
        colour = "green" if status == "cached" else "yellow"
        table.add_row(str(item.index + 1), item.name, item.config.type,
                      ", ".join(item.deps) or "-", f"[{colour}]{status}[/]", why)
    _out.print(table)
    _out.print("[green]pipeline is valid[/]")


@cli.command("schema")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of stdout.")
def schema_command(output: Path | None) -> None:
    """Print the JSON Schema of pipeline.yaml (for editor completion and validation)."""
    from edgemml.schema import pipeline_json_schema

    text = json.dumps(pipeline_json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text)
    else:
        click.echo(text, nl=False)


@cli.command("stages")
@click.argument("names", nargs=-1)
def stages_command(names: tuple[str, ...]) -> None:
    """List the stage types and their options, with defaults and help."""
    from edgemml import stages
    from edgemml.schema import describe_fields

    wanted = names or tuple(stages.names())
    for name in wanted:
        try:
            cls = stages.get(name)
        except KeyError:
            from edgemml.errors import ConfigError
            raise ConfigError(f"unknown stage type {name!r} (known: {', '.join(stages.names())})")
        doc = (cls.__doc__ or "").strip().splitlines()
        table = Table(title=f"{name}: {doc[0] if doc else ''}", title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for row in describe_fields(cls.Config):
            table.add_row(*row)
        _out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click group, map errors to exit codes without tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EDGEMML_DEBUG") not in (None, "", "0")
    try:
        cli.main(args=args, prog_name="edgemml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _err.print("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USER_ERROR)
    except EdgemmlError as exc:
        if debug:
            traceback.print_exc()
        _err.print(f"[red]error[/]: {escape(exc.format())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err.print("interrupted: finished stages are kept; run the same command to resume")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug in edgemml: say so, show the traceback on request
        if debug:
            traceback.print_exc()
        _err.print(f"[red]internal error[/]: {type(exc).__name__}: {escape(str(exc))}\n"
                   f"  run with --debug for the traceback", soft_wrap=True)
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
