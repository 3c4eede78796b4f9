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


# ---------------------------------------------------------------------------------------------------- --cross
FLAT = {d: 50.0 for d in ("PDI", "IDV", "MAS", "UAI", "LTO", "IVR")}


def _region_report(key: str, de_answers: dict, model: str = "m") -> dict:
    """A report for region ``key`` whose DE row answers ``de_answers`` on every presentation (naive: 50 everywhere,
    persona: 55)."""
    from culign.evaluation import Evaluation, PresentationScore
    from culign.survey import DIMENSIONS, Split, l1_loss
    from culign.targets import resolve

    target = resolve(key)
    split = Split(("vsm/chat/asc",), {}, {"wording:formal": ("formal/chat/asc", "formal/chat/desc"),
                                         "template:form": ("vsm/form/asc",)})
    rows = []
    for label, ind in (("naive", dict.fromkeys(DIMENSIONS, 50.0)), ("persona", dict.fromkeys(DIMENSIONS, 55.0)),
                       (f"{key}@1", de_answers)):
        rows.append(Evaluation(label, target, split, {n: PresentationScore(n, dict(ind), l1_loss(ind, target.scores),
                                                                           0.9, 0.4) for n in split.all_names}))
    return {**Comparison(target, split, rows).to_dict(), "model": model, "optimizer": "de"}


def _registry(root: Path, reports: dict[str, dict]) -> Path:
    import torch

    from culign.registry import Registry

    for key, report in reports.items():
        Registry(root).save(key, torch.zeros(2, 8), base_model=report["model"], base_fingerprint="sha256:base",
                            provenance={}, files={"report.json": json.dumps(report).encode()})
    return root


def test_cross_scores_every_row_against_every_target_from_the_reports(tmp_path):
    from culign.targets import resolve

    us, cn = resolve("US").scores, resolve("CN").scores
    # each region's adapter answers the *other* region's target exactly: a shift that is not its own region's
    root = _registry(tmp_path, {"US": _region_report("US", dict(cn)), "CN": _region_report("CN", dict(us))})
    r = CliRunner().invoke(main, ["report", "--cross", "--adapters-dir", str(root)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert _cells(lines[0]) == ["row", "target CN (CN@1)", "target US (US@1)"]
    rows = {c[0]: c[1:] for c in (_cells(ln) for ln in lines[2:] if ln.startswith("|"))}
    l1 = lambda a, b: sum(abs(a[d] - b[d]) for d in b) / len(b)  # noqa: E731
    assert rows["CN@1 DE"] == [f"{l1(us, cn):.2f}", "**0.00**"]  # CN's adapter is the best on US's target
    assert rows["US@1 DE"] == ["**0.00**", f"{l1(cn, us):.2f}"]
    assert rows["naive (of CN@1)"] == [f"{l1(dict.fromkeys(cn, 50.0), cn):.2f}", f"{l1(dict.fromkeys(us, 50.0), us):.2f}"]
    assert rows["US@1 persona"] == [f"{l1(dict.fromkeys(cn, 55.0), cn):.2f}", f"{l1(dict.fromkeys(us, 55.0), us):.2f}"]
    assert lines[-1].startswith("DE adapters best on their own target: 0 of 2")


def test_cross_of_the_committed_registry_agrees_with_each_report(tmp_path):
    """The diagonal is each report's own held-out L1, to the printed digit: the same answers, the same loss."""
    r = CliRunner().invoke(main, ["report", "--cross", "--adapters-dir", str(ADAPTERS)])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("|")]
    head = _cells(lines[0])[1:]
    rows = {c[0]: [x.strip("*") for x in c[1:]] for c in map(_cells, lines[2:])}
    for j, column in enumerate(head):
        ref = column.split("(")[1].rstrip(")")
        region, version = ref.split("@")
        report = json.loads((ADAPTERS / region / version / "report.json").read_text())
        assert rows[f"{ref} DE"][j] == f"{report['heldout_loss']:.2f}"
        assert rows[f"{ref} persona"][j] == f"{report['icl_heldout_loss']:.2f}"
        assert next(v for k, v in rows.items() if k.startswith("naive"))[j] == f"{report['naive_heldout_loss']:.2f}"


def test_cross_refuses_what_it_cannot_compare(tmp_path):
    one = _registry(tmp_path / "one", {"US": _region_report("US", FLAT)})
    r = CliRunner().invoke(main, ["report", "--cross", "--adapters-dir", str(one)])
    assert r.exit_code == 2 and "two regions or more" in r.output
    mixed = _registry(tmp_path / "mixed", {"US": _region_report("US", FLAT, model="a"),
                                          "CN": _region_report("CN", FLAT, model="b")})
    r = CliRunner().invoke(main, ["report", "--cross", "--adapters-dir", str(mixed)])
    assert r.exit_code == 2 and "different models" in r.output
    r = CliRunner().invoke(main, ["report", "--cross", "--table", "--adapters-dir", str(mixed)])
    assert r.exit_code == 2 and "ask for one" in r.output
