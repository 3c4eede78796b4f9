"""The committed adapters re-measured with each read-out (docs/results.md, "The committed adapters").

Every adapter in ./adapters was trained on the digit read-out. This scores each region's naive model, persona line
and adapter versions on the default split of each read-out asked for (digit: 31 presentations; label: the same
wordings on the label templates, options without digits), through culign's public API, and prints one table per
read-out: train / held-out L1, gain kept, held-out presentations beaten, order slope (the rows' moves on reversed
scales against ascending ones; +1 follows the labels, -1 the digit's position) and option mass.

    python bench/adapters_by_readout.py --readouts label        # ~4 x 124 presentation-evaluations
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import culign  # noqa: E402
from culign.model import cpu_capability  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readouts", default="digit,label")
    ap.add_argument("--regions", default="US,CN,IN,SA")
    ap.add_argument("--registry", default=str(REPO / "adapters"))
    ap.add_argument("--json", dest="json_out", default=None, help="also write every number here")
    args = ap.parse_args()
    print(f"CPU: {cpu_capability()}, torch threads {torch.get_num_threads()}, float32", flush=True)
    model = culign.load_model()
    registry = culign.open_registry(args.registry)
    everything = {}
    for readout in args.readouts.split(","):
        print(f"\n## {readout} read-out\n")
        print("| region | row | train | held-out | kept | held-out beaten | order slope | option mass |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for region in args.regions.split(","):
            versions = sorted(registry.versions(region), reverse=True)  # latest first: its split is the default
            t0 = time.perf_counter()
            result = culign.evaluate(region, model=model, persona=True, readout=readout, registry=registry,
                                     adapters=[f"{region}@{v}" for v in versions])
            c = result.comparison
            for row in result.rows:
                won, of = c.heldout_wins(row) if row.label != "naive" else (None, None)
                print(f"| {region} | {row.label} | {row.train_loss:.2f} | {_f(row.heldout_loss)} | "
                      f"{_f(c.gain_kept(row), '{:.0%}') if row.label != 'naive' else '-'} | "
                      f"{'-' if won is None else f'{won} of {of}'} | "
                      f"{_f(c.order_slope(row)) if row.label != 'naive' else '-'} | {row.option_mass:.2f} |",
                      flush=True)
            print(f"<!-- {region}: {len(result.split.all_names)} presentations x {len(result.rows)} rows in "
                  f"{time.perf_counter() - t0:.0f} s -->", flush=True)
            everything.setdefault(readout, {})[region] = result.to_dict()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
