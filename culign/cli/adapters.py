"""The registry from the command line: `culign report` and `culign adapters list|show|verify|rm`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import load_runtime, open_store, parse_ref, registry_dir, registry_option

@click.command("report")
@click.argument("what", required=False, metavar="[ADAPTER_DIR|REPORT_JSON|REGION[@V]]")
@registry_option
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: report-<REGION>-<version>.html, or registry-report.html, in "
                   "the current folder).")
@click.option("--table", "table", is_flag=True,
              help="Print the seed paper's table in Markdown instead (naive / persona / DE per adapter: training "
                   "L1, held-out L1 per family, noise band, gain kept, order slope, verdict), for the latest version "
                   "of every region, or for WHAT.")
@click.option("--cross", "cross", is_flag=True,
              help="Print in Markdown every region's persona and DE rows scored against every region's target "
                   "(held-out L1, from the reports' answers: nothing is scored again), for the latest version of "
                   "every region: does an adapter carry its region, or a move that every target likes?")
def report_cmd(what, adapters_dir, out, table, cross):
    """One self-contained HTML page (inline SVG, no network) for a run or for a whole registry.

    With an adapter folder, a report.json or REGION[@VERSION]: that run's page (radar of target, naive, persona
    and adapter on training and held-out presentations, per-index table, losses with gain kept and the noise
    band, the loss curve, the provenance). Without: one page for every adapter in the registry. `culign train`
    writes the run's page as report.html beside report.json already. Outputs: the HTML file; its path on stdout.
    With --table: the seed paper's table in Markdown on stdout instead (docs/results.md's tables come from it).
    With --cross: the registry's adapters against each other's targets, in Markdown on stdout.
    """
    from ..evaluation import Comparison
    from ..registry import RegistryError
    from ..report import cross_table, html_report, paper_table, registry_html

    if table and cross:
        raise click.UsageError("--table and --cross are two different tables: ask for one")
    if cross and what is not None:
        raise click.UsageError("--cross compares the regions of a registry: leave out WHAT (use --adapters-dir)")

    registry = open_store(registry_dir(adapters_dir), check=True)

    def load(path: Path) -> tuple[dict, Comparison]:
        try:
            report = json.loads(path.read_text())
            return report, Comparison.from_dict(report)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.BadParameter(f"{path}: not a readable culign report ({e})", param_hint="WHAT") from None

    if what is None:
        infos, _ = registry.scan()
        if table or cross:  # the latest version of each region (scan sorts by region, then version)
            infos = list({i.region: i for i in infos}.values())
        entries = [(i.ref, *load(i.path / "report.json")) for i in infos if (i.path / "report.json").exists()]
        if not entries:
            raise click.BadParameter(f"no adapter with a report.json in {registry.root}", param_hint="--adapters-dir")
        if table:
            click.echo(paper_table(entries))
            return
        if cross:
            try:
                click.echo(cross_table(entries))
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--adapters-dir") from None
            return
        page, default = registry_html(entries, str(registry.root)), Path("registry-report.html")
    else:
        path = Path(what)
        if path.is_dir():
            path = path / "report.json"
        if not path.exists():
            region, version = parse_ref(what)
            try:
                path = registry.resolve(region, version).path / "report.json"
            except (RegistryError, ValueError) as e:
                raise click.BadParameter(str(e), param_hint="WHAT") from None
        report, comparison = load(path)
        folder = path.parent
        name = f"{folder.parent.name}@{folder.name}" if folder.name.isdigit() else folder.name
        if table:
            click.echo(paper_table([(name, report, comparison)]))
            return
        page, default = html_report(report, comparison, title=name), Path(f"report-{name.replace('@', '-')}.html")
    target = out or default
    target.write_text(page, encoding="utf-8")
    click.echo(str(target))


@click.group("adapters")
@registry_option
@click.pass_context
def adapters_group(ctx, adapters_dir: Path | None):
    """List, inspect, verify and remove adapters in the registry (<adapters-dir>/<REGION>/<version>/)."""
    ctx.obj = {"adapters_dir": adapters_dir}


def _registry(ctx: click.Context, adapters_dir: Path | None):
    return open_store(registry_dir(adapters_dir, ctx), check=True)


@adapters_group.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def adapters_list(ctx, adapters_dir, as_json: bool):
    """Every version in the registry with its losses and base model; unreadable entries are reported, not fatal.

    Outputs: a table (or JSON) on stdout, warnings on stderr.
    """
    registry = _registry(ctx, adapters_dir)
    infos, warnings = registry.scan()
    if as_json:
        click.echo(json.dumps({"adapters": [i.to_dict() for i in infos], "warnings": warnings}, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    kept = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    click.echo(f"{'adapter':<12}{'tokens':>7}{'trained on':>11}{'train':>7}{'held-out':>10}{'kept':>6}  "
               f"{'verdict':<35}{'created':<26}base model")
    for i in infos:
        pres = "-" if i.train_presentations is None else f"{i.train_presentations} pres."
        click.echo(f"{i.ref:<12}{i.num_virtual_tokens:>7}{pres:>11}{fmt(i.loss):>7}{fmt(i.heldout_loss):>10}"
                   f"{kept(i.gain_kept):>6}  {i.verdict:<35}{i.created:<26}{i.base_model}"
                   + ("  INTERRUPTED (best prompt so far)" if i.interrupted else "")
                   + ("  INVALID MODEL (trained with --force-invalid)" if i.forced_invalid else ""))
    if not infos:
        click.echo(f"(no adapters in {registry.root})")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@adapters_group.command("show")
@click.argument("ref")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="The whole provenance (culign.json) as JSON.")
@click.pass_context
def adapters_show(ctx, ref: str, adapters_dir, as_json: bool):
    """Provenance and report of REF (REGION or REGION@VERSION; default the latest version).

    Outputs: the provenance (or JSON) on stdout.
    """
    from ..registry import RegistryError

    registry = _registry(ctx, adapters_dir)
    region, version = parse_ref(ref)
    try:
        info = registry.resolve(region, version)
        prov = json.loads((info.path / "culign.json").read_text())
    except (RegistryError, ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="REF") from None
    if as_json:
        click.echo(json.dumps(prov, indent=2, sort_keys=True))
        return
    click.echo(f"{info.ref}  {info.path}")
    for key in ("base_model", "base_fingerprint", "created", "culign_version", "seed", "optimizer", "robust",
                "evaluations", "presentation_evaluations", "loss", "validation_loss", "heldout_loss", "gain_kept",
                "naive_loss", "icl_loss", "option_mass", "train_presentations", "heldout_presentations",
                "interrupted", "readout", "forced_invalid", "weights_sha256"):
        if key in prov:
            click.echo(f"  {key:<26}{prov[key]}")
    why = (prov["verdict"].get("reasons") or []) if isinstance(prov.get("verdict"), dict) else []
    click.echo(f"  {'verdict':<26}{info.verdict}" + "".join(f"; {w}" for w in why))
    settings = prov.get("search") or prov.get("de")
    if settings:
        click.echo("  settings                  " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for f in ("report.json", "radar.png", "loss.png"):
        if (info.path / f).exists():
            click.echo(f"  {f:<26}{info.path / f}")


@adapters_group.command("verify")
@click.argument("refs", nargs=-1)
@registry_option
@click.option("--model", default=None, metavar="ID_OR_DIR",
              help="Also check compatibility (hidden size, base fingerprint) with this model (default: only "
                   "integrity; 'embedded' for the embedded SmolLM2).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def adapters_verify(ctx, refs, adapters_dir, model, as_json):
    """Check integrity (sha256, file shapes) of REFS (default: every adapter). Exit 1 if any fails.

    Outputs: one line per adapter (or JSON) on stdout.
    """
    registry = _registry(ctx, adapters_dir)
    kwargs = {}
    if model:
        rt = load_runtime(None if model == "embedded" else model, None, None)
        kwargs = {"hidden_size": rt.hidden_size, "base_fingerprint": rt.fingerprint}
    infos, warnings = registry.scan()
    targets = [parse_ref(r) for r in refs] or [(i.region, i.version) for i in infos]
    results = {}
    for region, version in targets:
        try:
            problems = registry.verify(region, version, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is a verification result here
            problems = [str(e)]
        results[f"{region}@{version}" if version else region] = problems
    if not refs:  # what the scan refused (and so a server never lists): the same rule, the same reasons
        results.update({getattr(w, "ref", f"(scan) {w}"): [str(w)] for w in warnings})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for ref, problems in results.items():
            click.echo(f"{ref}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    if any(results.values()):
        sys.exit(1)


@adapters_group.command("rm")
@click.argument("ref")
@registry_option
@click.option("--yes", is_flag=True, help="Remove without asking.")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.pass_context
def adapters_rm(ctx, ref: str, adapters_dir, yes: bool, dry_run: bool):
    """Remove REF: REGION@VERSION removes one version, REGION removes all of them.

    Outputs: what was (or would be) removed, on stdout.
    """
    from ..registry import RegistryError

    registry = _registry(ctx, adapters_dir)
    region, version = parse_ref(ref)
    try:
        doomed = [registry.resolve(region, version)] if version else \
            [registry.resolve(region, v) for v in registry.versions(region)]
    except (RegistryError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="REF") from None
    for info in doomed:
        click.echo(f"{'would remove' if dry_run else 'remove'} {info.ref} ({info.path})")
    if dry_run or not doomed:
        return
    if not yes:
        click.confirm(f"remove {len(doomed)} adapter version(s)?", abort=True)
    removed = registry.remove(region, version)
    click.echo(f"removed {', '.join(i.ref for i in removed)}")
