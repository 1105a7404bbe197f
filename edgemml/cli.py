"""The `edgemml` command line: parse, call, print. One function per command; no logic of its own.

Exit codes (documented in README.md): 0 success, 1 a validation gate failed, 2 user error (config,
missing file, bad input), 3 internal error, 130 interrupted.

Over the ~400-line guide on purpose: twelve commands, each a thin shell (options, one library call,
printing) sharing two consoles and one error handler; split by command, every part would import
those from a third module and the list of commands would no longer be read in one place.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
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

# emoji=False: rich would turn ":x:" in a user's text (a path, a class name, a file's first bytes
# quoted in an error) into an emoji; every user-provided string is also markup-escaped (_esc).
_out = Console(highlight=False, emoji=False)
_err = Console(stderr=True, highlight=False, emoji=False)


def _esc(value: Any) -> str:
    """A user-provided value (path, name, message) as literal text for rich."""
    return escape(str(value))


def _resume_command(command: str, target: Path, overrides: tuple[str, ...],
                    out_dir: Path | None) -> str:
    """The command line that repeats (and so resumes) this run: shown in crash hints."""
    args = ["edgemml", command, str(target)]
    for text in overrides:
        args += ["--set", text]
    if out_dir is not None:
        args += ["--out", str(out_dir)]
    return shlex.join(args)


def _verify_option() -> Any:
    return click.option("--verify", is_flag=True,
                        help="Also re-hash the recorded outputs of stages the plan does not "
                             "check (forced, downstream of a stage that re-runs, not needed by "
                             "--only) and report any that changed.")


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
@_verify_option()
def run_command(pipeline: Path, overrides: tuple[str, ...], out_dir: Path | None, force: bool,
                from_stage: str | None, only_stage: str | None, quiet: bool,
                log_json: bool, verify: bool) -> None:
    """Run PIPELINE, skipping stages whose inputs and config did not change."""
    from edgemml.pipeline.loader import load_pipeline
    from edgemml.pipeline import Runner
    from edgemml.progress import JsonReporter, QuietReporter, RichReporter

    if from_stage and only_stage:
        raise click.UsageError("--from and --only cannot be combined")
    loaded = load_pipeline(pipeline, list(overrides))
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun, like WORLD_SIZE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:  # rank 0 reports for every process
        quiet, log_json = True, False
        reporter: Any = _SilentReporter()
    else:
        reporter = JsonReporter() if log_json else QuietReporter() if quiet else RichReporter()
    runner = Runner(loaded, loaded.run_dir(out_dir), reporter, force=force, from_stage=from_stage,
                    only_stage=only_stage, rank=rank, world_size=world, verify=verify,
                    command=_resume_command("run", pipeline, overrides, out_dir))
    with reporter:
        outcomes = runner.run()
    if not quiet and not log_json:
        ran = sum(o.status == "ran" for o in outcomes)
        cached = sum(o.status == "cached" for o in outcomes)
        _out.print(f"[green]done[/]: {ran} stage(s) ran, {cached} cached; run directory: "
                   f"{_esc(runner.run_dir)}")
        for line in _highlights(outcomes):
            _out.print(_esc(line))


class _SilentReporter:
    """What ranks other than 0 report under torchrun: nothing (rank 0 speaks for all)."""

    def event(self, kind: str, **data: Any) -> None:
        pass

    def progress(self, description: str, total: float | None) -> Any:
        from edgemml.progress import QuietReporter
        return QuietReporter().progress(description, total)

    def __enter__(self) -> _SilentReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _highlights(outcomes: list[Any]) -> list[str]:
    """Lines a stage asked to be shown at the end of a run (e.g. where the bundle is)."""
    lines: list[str] = []
    for o in outcomes:
        for text in o.highlights:
            lines.append(f"  {o.name}: {text}")
    return lines


@cli.command("check")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@_set_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to compare against (default: runs/<pipeline name>).")
@_verify_option()
def check_command(pipeline: Path, overrides: tuple[str, ...], out_dir: Path | None,
                  verify: bool) -> None:
    """Validate PIPELINE and print which stages would run and which are cached."""
    from edgemml.pipeline.loader import load_pipeline
    from edgemml.pipeline import Runner
    from edgemml.progress import QuietReporter

    loaded = load_pipeline(pipeline, list(overrides))
    runner = Runner(loaded, loaded.run_dir(out_dir), QuietReporter(), verify=verify)
    table = Table(title=f"{loaded.config.name}: {_esc(runner.run_dir)}")
    for col in ("#", "stage", "type", "reads", "plan", "why"):
        table.add_column(col)
    for item, status, why in runner.dry_plan():
        colour = "green" if status == "cached" else "yellow"
        table.add_row(str(item.index + 1), item.name, item.config.type,
                      ", ".join(item.deps) or "-", f"[{colour}]{status}[/]", _esc(why))
    _out.print(table)
    _out.print("[green]pipeline is valid[/]")


@cli.command("schema")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of stdout.")
def schema_command(output: Path | None) -> None:
    """Print the JSON Schema of pipeline.yaml (for editor completion and validation)."""
    from edgemml.pipeline.schema import pipeline_json_schema

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
    from edgemml.pipeline.schema import describe_fields

    wanted = names or tuple(stages.names())
    for name in wanted:
        try:
            cls = stages.get(name)
        except KeyError:
            from edgemml.errors import ConfigError
            raise ConfigError(f"unknown stage type {name!r} (known: {', '.join(stages.names())})")
        doc = (cls.__doc__ or "").strip().splitlines()
        table = Table(title=_esc(f"{name}: {doc[0] if doc else ''}"), title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for row in describe_fields(cls.Config):
            table.add_row(*(_esc(cell) for cell in row))
        _out.print(table)


@cli.command("validate")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@_set_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: runs/<name>, name defaulting to the file's stem).")
@click.option("--force", is_flag=True, help="Re-measure even when nothing changed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; warnings and errors only.")
@click.option("--log-json", is_flag=True, help="Print one JSON event per line on stdout.")
def validate_command(config_file: Path, overrides: tuple[str, ...], out_dir: Path | None,
                     force: bool, quiet: bool, log_json: bool) -> None:
    """Validate models made elsewhere (ONNX, OpenVINO, a bundle) against gates.

    CONFIG_FILE holds the validate stage's options at the top level (artifacts, reference, bundle,
    gates, baseline, ...) plus optional name, seed, data and preprocess. Exits 1 when a gate fails.
    """
    from edgemml.pipeline.loader import load_standalone
    from edgemml.pipeline import Runner
    from edgemml.progress import JsonReporter, QuietReporter, RichReporter

    loaded = load_standalone(config_file, list(overrides))
    reporter = JsonReporter() if log_json else QuietReporter() if quiet else RichReporter()
    runner = Runner(loaded, loaded.run_dir(out_dir), reporter, force=force,
                    command=_resume_command("validate", config_file, overrides, out_dir))
    with reporter:
        outcomes = runner.run()
    if not quiet and not log_json:
        _out.print(f"[green]passed[/]: run directory {_esc(runner.run_dir)}")
        for line in _highlights(outcomes):
            _out.print(_esc(line))


@cli.command("report")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the re-rendered files (default: RUN_DIR/report).")
def report_command(run_dir: Path, out_dir: Path | None) -> None:
    """Re-render report.md, junit.xml and report.html from a run's report.json.

    RUN_DIR is a run directory, a validate stage folder or a report.json. The files are written to
    a separate folder so the stage's recorded outputs (and its cache) stay untouched.
    """
    from edgemml.report import find_report, load_report, render_from
    from edgemml.report.gates import failure_lines, required_failures

    path = run_dir if run_dir.is_file() else find_report(run_dir)
    out = out_dir or path.parent.parent / "report"
    paths = render_from(path, out)
    report = load_report(path)
    failed = required_failures(report.get("gates", []))
    colour = "green" if report.get("status") == "passed" else "red"
    _out.print(f"[{colour}]{_esc(report.get('status'))}[/]: {failed} of "
               f"{len(report.get('gates', []))} gate(s) failed ({_esc(path)})")
    for line in failure_lines(report.get("gates", [])):
        _out.print(f"  {escape(line)}")
    for key, p in paths.items():
        _out.print(f"  {key}: {_esc(p)}")


@cli.command("compare")
@click.argument("run_a", type=click.Path(exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def compare_command(run_a: Path, run_b: Path, as_json: bool) -> None:
    """Print how the validation figures of RUN_B differ from RUN_A (e.g. a branch vs main).

    Each argument is a run directory, a validate stage folder or a report.json.
    """
    from edgemml.report import load_report
    from edgemml.report.compare import compare_reports, gate_changes
    from edgemml.report.gates import fmt

    a, b = load_report(run_a), load_report(run_b)
    rows, changes = compare_reports(a, b), gate_changes(a, b)
    if as_json:
        click.echo(json.dumps({"a": str(run_a), "b": str(run_b), "metrics": rows,
                               "gates": changes}, indent=2))
        return
    table = Table(title=_esc(f"A = {run_a} ({a.get('status')}), B = {run_b} ({b.get('status')})"),
                  title_justify="left")
    for col in ("artifact", "metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col in ("artifact", "metric") else "right")
    for r in rows:
        colour = {True: "green", False: "red"}.get(r["better"])
        delta = fmt(r["delta"]) if r["delta"] is not None else (
            "only in A" if r["b"] is None else "only in B")
        table.add_row(_esc(r["artifact"]), _esc(r["metric"]), _esc(fmt(r["a"])), _esc(fmt(r["b"])),
                      f"[{colour}]{_esc(delta)}[/]" if colour else _esc(delta))
    _out.print(table)
    for c in changes:
        _out.print(_esc(f"gate {c['gate']} ({c['artifact'] or '-'}): {c['a'] or 'absent'} -> "
                        f"{c['b'] or 'absent'}"))
    if not changes:
        _out.print("no gate changed status")


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "public_key", type=click.Path(dir_okay=False, path_type=Path),
              help="The signer's ed25519 public key (PEM, or an OpenSSH ssh-ed25519 line): the "
                   "signature must verify. Without it only the file hashes are checked.")
def verify_command(bundle: Path, public_key: Path | None) -> None:
    """Check a bundle: every file matches manifest.json, nothing extra, and with --key the
    signature. Exit 0 verified, 1 refused (names the file), 2 cannot check."""
    from edgemml.exporters.signing import verify_bundle

    _out.print(escape(verify_bundle(bundle, public_key).summary()), soft_wrap=True)


@cli.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", "public_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the public key (default: KEY with .pub.pem).")
def keygen_command(private_key: Path, public_key: Path | None) -> None:
    """Write a new ed25519 key pair for signing bundles (private key mode 0600, encrypted with
    $EDGEMML_SIGN_PASSPHRASE when set). Never overwrites a key."""
    from edgemml.exporters.signing import PASSPHRASE_ENV, generate_keypair

    passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    priv, pub, kid = generate_keypair(private_key, public_key, passphrase=passphrase)
    _out.print(escape(f"new key {kid}: private {priv} (keep it secret, out of version control), "
                      f"public {pub} (give it to whoever verifies)"), soft_wrap=True)


@cli.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "private_key", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="ed25519 private key (PEM).")
def sign_command(bundle: Path, private_key: Path) -> None:
    """Sign a bundle made earlier (e.g. in a CI job that holds the key): its files are checked
    against manifest.json first, then manifest.sig is written."""
    from edgemml.exporters.signing import sign_bundle, signing_key_id

    path = sign_bundle(bundle, private_key)
    _out.print(escape(f"{path}: signed with {signing_key_id(private_key)}"), soft_wrap=True)
@cli.command("roofline")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Thread count (use the validate stage's `threads:`).")
@click.option("--size", type=click.IntRange(64, 8192), default=None,
              help="m = k = n of the timed matrix product (default 1024, or $EDGEMML_ROOFLINE_SIZE).")
@click.option("--repeats", type=click.IntRange(1, 10000), default=30, show_default=True,
              help="Timed calls per runtime and precision (median reported).")
@click.option("--force", is_flag=True, help="Measure again even when a cached peak exists.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the roofline to this file (for validate's `roofline: FILE`).")
@click.option("--json", "as_json", is_flag=True, help="Print the roofline as JSON.")
def roofline_command(threads: int, size: int | None, repeats: int, force: bool, out_file: Path | None,
                     as_json: bool) -> None:
    """This machine's peak MAC rate per runtime and precision at THREADS threads.

    Measured once (one large product as a MatMul and as a 1x1 Conv, fp32 and int8 QDQ, through
    edgemml's runtime layer) and cached per CPU model, CPU features, library versions and thread
    count in $EDGEMML_CACHE_DIR, $XDG_CACHE_HOME/edgemml or ~/.cache/edgemml; validate's
    `% of peak` divides by it.
    """
    from edgemml import roofline
    from edgemml.errors import InputError

    def say(line: str) -> None:
        if not as_json:
            _err.print(f"  {escape(line)}")

    path = roofline.cache_path(threads)
    if not as_json:
        _err.print(f"peak MAC rates at {threads} thread(s): measured once per machine, library "
                   f"versions and thread count, then read from {path.parent}")
    roof = roofline.cached(threads, size=size, repeats=repeats, force=force, log=say,
                           warn=lambda m: _err.print(f"[yellow]warning[/]: {escape(m)}"))
    if out_file is not None:
        try:
            roofline.save(roof, out_file)
        except OSError as exc:
            raise InputError(f"cannot write {out_file}: {exc.strerror or exc}", file=out_file,
                             hint="give a writable file path") from None
    if as_json:
        click.echo(roofline.as_json(roof))
        return
    table = Table(title=f"{roof.key['cpu']}, {threads} thread(s), a {roof.size}^3 product, "
                        f"measured {roof.created} (load {roof.loadavg[:1] or '?'})",
                  title_justify="left")
    for col in ("runtime", "kernel", "stored", "runs in", "fastest ms", "median ms", "GMAC/s"):
        table.add_column(col, justify="left" if col in ("runtime", "kernel", "stored", "runs in")
                         else "right")
    for r in roof.rows:
        table.add_row(r.runtime, r.kernel, r.dtype, r.precision, f"{r.min_ms:.3f}",
                      f"{r.median_ms:.3f}", f"{r.gmacs_per_s:.1f}")
    _out.print(table)
    _out.print(f"cached in {roof.path or path}" + (f"; written to {out_file}" if out_file else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click group, map errors to exit codes without tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EDGEMML_DEBUG") not in (None, "", "0")
    try:
        cli.main(args=args, prog_name="edgemml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        _err.print(_INTERRUPTED if isinstance(exc.__cause__ or exc.__context__,
                                              KeyboardInterrupt) else "aborted")
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
        _err.print(_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:  # a file the user named, or the run folder: theirs to fix (exit 2)
        if debug:
            traceback.print_exc()
        from edgemml.paths import os_error

        _err.print(f"[red]error[/]: {_esc(os_error(exc).format())}", soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:  # a bug in edgemml: say so, keep the traceback in a file
        if debug:
            traceback.print_exc()
        _err.print(f"[red]internal error[/]: {type(exc).__name__}: {_esc(exc)}\n"
                   f"  {_esc(_error_log())}", soft_wrap=True)
        sys.exit(EXIT_INTERNAL_ERROR)


_INTERRUPTED = "interrupted: finished stages are kept; run the same command to resume"


def _error_log() -> str:
    """Write the current traceback to a new file in the temporary folder (a crash outside a run
    has no run folder of its own to hold it) and say where it is."""
    try:
        fd, path = tempfile.mkstemp(prefix="edgemml-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        return f"traceback in {path}"
    except OSError:
        return "run with --debug for the traceback"


if __name__ == "__main__":
    main()
