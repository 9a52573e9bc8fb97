"""`quantkit`: the group, its one error edge, and the command modules it mounts."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from quantkit import EXLLAMAV2_VERSION, __version__
from quantkit.cli.errors import debug_enabled, format_error
from quantkit.cli.output import Output
from quantkit.errors import QuantkitError


class QuantkitGroup(click.Group):
    """Turns every error into one line on stderr and exit status 1 (click's usage errors keep 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            # `quantkit archs | head -1`: the reader has what it wanted; that is success, and the
            # interpreter must not complain when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)
        except QuantkitError as exc:
            if debug_enabled():
                raise
            Output().error(format_error(exc))
            ctx.exit(1)
        except Exception as exc:  # noqa: BLE001 - the edge: anything else is still one line
            if debug_enabled():
                raise
            Output().error(format_error(exc))
            ctx.exit(1)


@click.group(cls=QuantkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="quantkit", message=f"%(prog)s %(version)s (models exllamav2 {EXLLAMAV2_VERSION})")
def cli() -> None:
    """Turn a Hugging Face LLM into published ExLlamaV2 (EXL2) quants, each with an honest VRAM plan.

    \b
    Examples:
      quantkit vram examples/llama3-8b --gpu 12GiB
      quantkit archs
    """


def _mount() -> None:
    from quantkit.cli import archs, calibration, card, measure, publish, run, vram

    cli.add_command(vram.vram)
    cli.add_command(archs.archs)
    cli.add_command(card.card)
    cli.add_command(publish.publish)
    cli.add_command(calibration.calibration)
    cli.add_command(measure.measure)
    cli.add_command(measure.convert)
    cli.add_command(run.run)


_mount()


def main() -> None:
    cli(prog_name="quantkit")


if __name__ == "__main__":
    sys.exit(main())
