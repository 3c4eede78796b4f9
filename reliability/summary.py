"""Print the suite's one summary table from the results file (CULIGN_RELIABILITY_OUT, one JSON object a line).

    python -m reliability.summary runs/reliability.jsonl
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def _cpu() -> str:
    try:
        from culign.model import cpu_capability

        return str(cpu_capability())
    except Exception as e:  # noqa: BLE001 - the table must print whatever happened
        return f"unknown ({e})"


def table(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["part"]].append(r)
    out = [f"culign reliability suite (CPU: {_cpu()})", "",
           f"{'part':<42}{'result':<62}verdict", "-" * 114]

    engine = {"": ""}

    def line(part, result, ok):
        verdict = ok if isinstance(ok, str) else "pass" if ok else "FAIL"
        part = f"{engine['']}{part}"
        out.append(f"{part[:41]:<42}{result[:61]:<62}{verdict}")

    for r in by["hostile"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line("hostile corpus", f"{r['cases']} cases: 2xx {r.get('2xx', 0)}, 4xx {r.get('4xx', 0)}, "
             f"5xx {r.get('5xx', 0)}, hangs {r.get('hang', 0)}, dropped {r.get('dropped', 0)}",
             "xfail (known hangs)" if r.get("known_bad") and r.get("hang", 0) == r["known_bad"].get("hang", 0)
             and not r.get("5xx") else not r.get("5xx") and not r.get("hang"))
        if r.get("failed"):
            line("  ...of which off-contract", f"{r['failed']} (xfail: known engine defects, see below)", True)
    for r in by["auth"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line("API-key cases (keyed server)", f"{r['cases']} cases: 4xx {r.get('4xx', 0)}, 5xx {r.get('5xx', 0)}, "
             f"hangs {r.get('hang', 0)}, off-contract {r['failed']}", not r["failed"])
    for r in by["fuzz"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line(f"schemathesis {r['mode']} {r['path']}", f"{r['cases']} cases: 2xx {r.get('2xx', 0)}, 4xx "
             f"{r.get('4xx', 0)}, 5xx {r.get('5xx', 0)}, hangs {r.get('hang', 0)}, 4xx unnamed {r['unnamed_4xx']}",
             not r.get("5xx") and not r.get("hang") and not r["unnamed_4xx"])
    for r in by["load"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line(f"load {r['clients']} clients {r['seconds']:.0f} s", f"{r['requests']} req ({r['rps']}/s), errors "
             f"{r['errors']}, 429 {r['rejected_429']}, p50 {r['p50_s']} s, p99 {r['p99_s']} s", r["errors"] == 0)
        line("  worker RSS", f"{r['rss_before_mb']} -> {r['rss_after_mb']} MB (bound +{r['rss_bound_mb']:.0f} MB)",
             r["rss_growth_mb"] < r["rss_bound_mb"])
    for r in by["disconnect"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line(f"{r['streams']} streams dropped after 1 chunk", f"rows gone in {r['drain_s']} s, next request "
             f"{r['after_s']} s (solo {r['solo_s']}/{r['solo_again_s']} s)", r["first_chunks"] == r["streams"] and
             r["drain_s"] < max(3.0, 0.25 * r["solo_s"]) and r["cancelled_rows"] >= r["streams"] - 1)
        line("  worker RSS", f"{r['rss_before_mb']} -> {r['rss_after_mb']} MB, rows cancelled {r['cancelled_rows']}",
             r["rss_after_mb"] - r["rss_before_mb"] < 100)
    for r in by["fault"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        detail = {k: v for k, v in r.items() if k not in ("part", "fault", "body", "problems")}
        line(f"fault: {r['fault']}", json.dumps(detail), "xfail (engine defect)" if r.get("problems") else True)
        if r.get("problems"):
            out.append(f"{'':<42}{r['problems'][0][:72]}")
    for r in by["engine-death"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        for k in r["rows"]:
            line(f"engine killed ({k['kill']} of {len(r['rows'])})", f"in-flight ended {k['in_flight_ended_s']} s, "
                 f"first 200 {k['first_200_s']} s, readyz 503 {'seen' if k['readyz_503_seen'] else 'not seen'}, "
                 f"zombies {k['zombies']}, RSS {k['rss_worker_mb']} MB", k["zombies"] == 0)
        if r.get("cold_start_s"):
            worst = max(k["first_200_s"] for k in r["rows"])
            line("  kill -> first 200 vs cold start", f"{worst} s vs {r['cold_start_s']} s (goal <= 2x)",
                 worst <= 2 * r["cold_start_s"] or "over the goal")
    for r in by["kill-resume"]:
        engine[""] = f"[{r['engine']}] " if r.get("engine") else ""
        line(f"kill/resume: {r['scenario']}", f"{' + '.join(r['killed'])[:46]}; {r['final']} exact", r["exact"])
    return "\n".join(out)


def main(path: str) -> int:
    try:
        rows = [json.loads(x) for x in open(path) if x.strip()]
    except FileNotFoundError:
        print(f"no results in {path}")
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/reliability.jsonl"))
