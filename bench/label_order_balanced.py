"""Does the label read-out with order-balanced training bring a held-out gain outside the noise band? (issue 18)

The embedded model fails the validity check on both read-outs, so `culign train` would neither train it nor balance
the orders by itself: this forces both (force_invalid=True, order_balanced=True) and trains each region on the
label read-out, on a demo-sized split and a small budget, so that four regions fit in about half an hour on 2 cores:

    train     vsm/label_chat, plain/label_inline, terse/label_form    x both scale orders (6 presentations)
    held-out  formal/label_chat (a new wording), vsm/label_interview (a new template)   x both orders (4)

Printed per region: naive, persona and adapter L1 on training and held-out presentations, the held-out gain
against the naive model's noise band (its L1 std across the presentations), held-out presentations beaten,
the order slope and the gain kept. Settings and the seed are fixed; nothing is tuned to the held-out numbers.

    python bench/label_order_balanced.py                   # US, CN, IN, SA; ~7 min each on 2 cores (AVX2, fp32)
    python bench/label_order_balanced.py --regions US --budget 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import culign  # noqa: E402
from culign.model import cpu_capability  # noqa: E402

TRAIN = ["vsm/label_chat/asc", "plain/label_inline/asc", "terse/label_form/asc"]
HELDOUT = ["formal/label_chat/asc", "vsm/label_interview/asc"]


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", default="US,CN,IN,SA")
    ap.add_argument("--budget", type=int, default=80, help="candidate evaluations (5 generations of 16)")
    ap.add_argument("--minutes", type=float, default=20.0, help="a safety cap on each search (the budget should end it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="registry for the adapters (default: a temporary folder)")
    args = ap.parse_args()

    rt = culign.load_model(dtype="float32")
    print(f"CPU: {cpu_capability()}; {rt.name} in float32; label read-out, both scale orders, forced (the model "
          f"fails the validity check); search capped at {args.minutes:g} min, budget {args.budget}, seed {args.seed}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="culign-label-") as scratch:
        for region in args.regions.split(","):
            t0 = time.perf_counter()
            result = culign.train(region, model=rt, registry=args.out or scratch, readout="label",
                                  force_invalid=True, order_balanced=True, train=TRAIN, heldout=HELDOUT,
                                  validation=[], budget=args.budget, max_seconds=60 * args.minutes, seed=args.seed)
            r = result.report
            adapter = r["rows"]["adapter"]
            band = r["noise_band"]["L1"]
            gain = r["naive_heldout_loss"] - r["heldout_loss"]
            rows.append((region, r, adapter, band, gain, time.perf_counter() - t0))
            print(f"{region}: done in {time.perf_counter() - t0:.0f} s ({r['presentation_evaluations']} "
                  f"presentation-evaluations; train {r['split']['train']})", flush=True)

    print(f"\n{'region':<7} {'naive tr/ho':>13} {'persona tr/ho':>14} {'adapter tr/ho':>14} {'ho gain':>8} "
          f"{'band':>6} {'outside':>8} {'beaten':>7} {'slope':>6} {'kept':>7} {'wall':>6}")
    for region, r, a, band, gain, wall in rows:
        beaten = "{}/{}".format(*a["heldout_wins"])
        print(f"{region:<7} {r['naive_loss']:>6.2f}/{r['naive_heldout_loss']:<6.2f} "
              f"{r['icl_loss']:>6.2f}/{r['icl_heldout_loss']:<7.2f} {r['train_loss']:>6.2f}/{r['heldout_loss']:<7.2f} "
              f"{gain:>+8.2f} {band:>6.2f} {'yes' if abs(gain) > band and gain > 0 else 'no':>8} {beaten:>7} "
              f"{_f(a.get('order_slope'), '{:+.2f}'):>6} {_f(r['gain_kept'], '{:+.0%}'):>7} {wall:>5.0f}s")
    print("\nho gain: naive held-out L1 minus the adapter's (positive = better); band: the naive model's L1 std across "
          "the presentations; outside: a gain larger than the band.")


if __name__ == "__main__":
    main()
