"""`culign report --table`: the seed paper's table (naive / persona / DE per region) from a registry's reports."""
import json
from pathlib import Path

from click.testing import CliRunner

from culign.cli import main
from culign.evaluation import Comparison
from culign.registry.format import verdict_of

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_table_of_the_committed_registry_is_its_reports_numbers():
    r = CliRunner().invoke(main, ["report", "--table", "--adapters-dir", str(ADAPTERS)])
    assert r.exit_code == 0, r.output
    head, rule, *rows = r.output.strip().splitlines()
    columns = _cells(head)
    assert columns[:3] == ["adapter", "row", "train L1"] and columns[-5:] == [
        "held-out L1", "band", "gain kept", "order slope", "verdict"]
    regions = sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir())
    assert len(rows) == 3 * len(regions)  # the latest version of each region: naive, persona, DE
    for i, region in enumerate(regions):
        version = max(int(v.name) for v in (ADAPTERS / region).iterdir() if v.name.isdigit())
        report = json.loads((ADAPTERS / region / str(version) / "report.json").read_text())
        c = Comparison.from_dict(report)
        naive, persona, de = (dict(zip(columns, _cells(ln))) for ln in rows[3 * i: 3 * i + 3])
        assert naive["adapter"] == f"{region}@{version}" and [naive["row"], persona["row"], de["row"]] == [
            "naive", "persona", "DE"]
        assert de["train L1"] == f"{report['train_loss']:.2f}" and de["held-out L1"] == f"{report['heldout_loss']:.2f}"
        assert naive["band"] == f"{c.noise_band()['L1']:.2f}" and de["band"] == ""
        for family, loss in c.rows[-1].heldout_by_family.items():
            assert de[f"held-out {family}"] == f"{loss:.2f}"
        assert de["verdict"] == verdict_of(report) and de["order slope"] == f"{c.order_slope(c.rows[-1]):+.2f}"
        assert naive["verdict"] == "" and persona["verdict"]  # the persona line is judged by the same rule


def test_one_adapter_and_the_persona_judged_like_an_adapter(tmp_path):
    from test_report_html import _comparison

    comparison = _comparison()  # persona +3, the adapter +8 on every index and presentation: both follow the labels
    run = tmp_path / "US" / "2"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({**comparison.to_dict(), "model": "m"}))
    r = CliRunner().invoke(main, ["report", str(run), "--table"])
    assert r.exit_code == 0, r.output
    head, _, naive, persona, de = r.output.strip().splitlines()
    persona = dict(zip(_cells(head), _cells(persona)))
    assert persona["order slope"] == "+1.00"
    # +3 on every index brings as many US targets nearer as it takes away: no L1 gain on any held-out family
    assert persona["verdict"] == "gain not shown"
    assert _cells(de)[-1] == "not judged"  # this report predates verdicts: it says so, nothing is made up
