"""The ``lmsurgeon`` command line: a thin layer that parses, calls the Python API and prints.

Errors that are the user's (``LmsurgeonError``) become one line on stderr and exit code 1; usage errors exit
2 (click's convention); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from lmsurgeon import __version__
from lmsurgeon.cli.inspect import inspect_cmd
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.report.progress import show_stage_lines

EPILOG = """\b
Examples:
  lmsurgeon demo                          # the whole offline tour (zoo, lineage, swap, merge)
  lmsurgeon inspect minilm                # tensors, family and roles of a checkpoint
  lmsurgeon lineage minilm ./my-finetune  # does one model derive from another?
  lmsurgeon swap ./deep-model             # which adjacent layers can be swapped?
  lmsurgeon merge --base B --donor D      # cross-architecture embedding merge
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lmsurgeon")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Weight-space forensics and surgery on transformer language models.

    Sources are local Hugging Face model folders (single or sharded safetensors), hub ids
    org/name[@revision] (read by HTTP range requests) or the bundled alias `minilm`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    show_stage_lines(not sys.stderr.isatty())  # a log gets one line per stage where a terminal gets bars


cli.add_command(inspect_cmd)
for _module, _name in [
    ("lmsurgeon.cli.lineage", "lineage"),
    ("lmsurgeon.cli.swap", "swap"),
    ("lmsurgeon.cli.merge", "merge"),
    ("lmsurgeon.cli.merge", "compare_generation"),
    ("lmsurgeon.cli.zoo", "zoo"),
    ("lmsurgeon.cli.demo", "demo"),
]:
    try:
        _mod = __import__(_module, fromlist=[_name])
    except ModuleNotFoundError as _e:  # a capability not installed in this build
        if _e.name != _module:
            raise
        continue
    cli.add_command(getattr(_mod, _name))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return _run(argv, debug)
    finally:
        show_stage_lines(False)  # library calls after a command (tests, notebooks) stay quiet


def _run(argv: list[str] | None, debug: bool) -> int:
    """Run one command and turn what it raises into the exit code and one line on stderr."""
    try:
        cli.main(args=argv, prog_name="lmsurgeon", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except LmsurgeonError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except MemoryError:
        if debug:
            raise
        click.echo("error: out of memory", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
