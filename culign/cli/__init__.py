"""The `culign` command line: regions, presentations, validity, eval, train, report, adapters. Argument parsing and
printing over :mod:`culign.api`; friendly errors live here and only here. One module per group of commands:
:mod:`.info` (regions, presentations), :mod:`.measure` (validity, eval), :mod:`.train`, :mod:`.adapters` (report,
adapters list/show/verify/rm); :mod:`.common` holds the shared options."""
from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from .adapters import adapters_group, report_cmd
from .info import models_cmd, presentations_cmd, regions_cmd
from .measure import eval_cmd, validity_cmd
from .train import train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="culign")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (loading, rescans, ...).")
def main(verbose: bool):
    """Cultural alignment of a frozen LLM with soft prompts (Masoud et al., 2025).

    The frozen model answers Hofstede's VSM 2013 survey; its answers give six indices (PDI, IDV, MAS, UAI,
    LTO, IVR) compared with a region's published scores by L1 loss. `train` tunes a soft prompt black-box (DE,
    CMA-ES) on many wordings and templates of the survey and checks it on ones it never saw; `eval` measures a
    model, a persona prompt or an adapter the same way.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for command in (regions_cmd, presentations_cmd, models_cmd, validity_cmd, eval_cmd, train_cmd, report_cmd,
                adapters_group):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
