"""The HTML report in a real headless browser (Debian's Chromium driven by Playwright): it loads with no console
errors, its radar holds the four series, and a screenshot is left in runs/test-artifacts/ for a person to look at."""
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from culign.cli import main
from culign.evaluation import Comparison, Evaluation, PresentationScore
from culign.report import html_report
from culign.survey import DIMENSIONS, Split
from culign.targets import resolve

ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _comparison() -> Comparison:
    target = resolve("US")
    split = Split(("vsm/chat/asc", "plain/form/asc"), {"wording:casual": ("casual/chat/asc",)},
                  {"wording:formal": ("formal/chat/asc",), "order:desc": ("vsm/chat/desc",)})
    rows = []
    for label, shift in (("naive", 0.0), ("persona", 3.0), ("US@2", 8.0)):
        scores = {}
        for i, n in enumerate(split.all_names):
            ind = {d: 50.0 + shift + i + 2 * k for k, d in enumerate(DIMENSIONS)}
            loss = sum(abs(ind[d] - v) for d, v in target.scores.items()) / len(target.scores)
            scores[n] = PresentationScore(n, ind, loss, 0.9, 0.4)
        rows.append(Evaluation(label, target, split, scores))
    return Comparison(target, split, rows)


def _browser():
    if CHROMIUM is None:
        if os.environ.get("CULIGN_REQUIRE_BROWSER"):
            pytest.fail("CULIGN_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api.sync_playwright()


def test_report_page_renders_in_a_real_browser(tmp_path):
    comparison = _comparison()
    report = {**comparison.to_dict(), "model": "embedded:SmolLM2-135M-Instruct", "dtype": "float32", "seed": 0,
              "optimizer": "de", "history": [[16, 24.0], [32, 22.5], [48, 21.0]], "interrupted": True}
    page_file = tmp_path / "report.html"
    page_file.write_text(html_report(report, comparison, title="US@2"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with _browser() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        series = page.eval_on_selector_all("[id^='series-'][id$='-training']", "els => els.map(e => e.id)")
        heldout = page.eval_on_selector_all("[id^='series-'][id$='-held-out']", "els => els.length")
        title = page.title()
        banner = page.inner_text(".banner")
        shot = ARTIFACTS / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert all(u.startswith("file:") or u.startswith("data:") for u in requests)  # self-contained: no network
    assert sorted(series) == ["series-US_2-training", "series-naive-training", "series-persona-training",
                              "series-target-training"]
    assert heldout == 4 and "US@2" in title and "Interrupted" in banner
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot for a person to look at: {shot}")


def test_culign_report_writes_a_page_for_a_run_and_for_a_registry(tmp_path):
    comparison = _comparison()
    run = tmp_path / "adapters" / "US" / "2"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({**comparison.to_dict(), "model": "m"}))
    out = tmp_path / "one.html"
    r = CliRunner().invoke(main, ["report", str(run), "--out", str(out)])
    assert r.exit_code == 0 and out.exists() and "series-naive-training" in out.read_text()
    # every row moves all indices alike on vsm/chat/asc and vsm/chat/desc: it follows the labels (slope +1)
    assert "US@2: order slope +1.00" in out.read_text() and "follow the answer labels" in out.read_text()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "Traceback" not in r.output
