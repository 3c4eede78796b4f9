"""The fan-out's cost, measured against the same regions trained one after another, in one run.

  sequential 1T   the regions one after another in this process, torch at 1 thread
  ray 1x1         the same jobs as Ray tasks, one worker of 1 CPU: what Ray itself costs a region (task start,
                  model load in the worker, the progress board)
  sequential 2T   one after another at 2 threads: the machine's cores on one region at a time
  ray 2x1         two workers of 1 CPU each: the machine's cores on two regions at a time (equal total cores)

Then the registry: publishing and loading one adapter in a local folder against SeaweedFS's S3 on 127.0.0.1.
And a projection (labelled as one) for all 111 regions of the Hofstede table on M machines, from the measured
per-region time. On 2 cores no real speed-up is possible; the figures are the overhead and the correctness
(every fan-out adapter equals its sequential twin byte for byte at the same thread count).

    python bench/fanout.py [--regions US,CN,IN,SA] [--budget 16] [--popsize 8] [--model ID_OR_DIR] [--repeats 20]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # culign.fanout.LOOPBACK_ENV: a local cluster
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reliability/ (the SeaweedFS launcher) at the root

import torch  # noqa: E402

from culign.fanout import RegionJob, fan_out, run_sequential  # noqa: E402
from culign.optimize import SearchConfig  # noqa: E402
from culign.model import cpu_capability  # noqa: E402
from culign.targets import TABLE, resolve  # noqa: E402
from culign.trainer import TrainSettings  # noqa: E402
from culign.survey import Split  # noqa: E402


def jobs(regions, args, root: Path, threads: int) -> list[RegionJob]:
    split = Split(train=("vsm/chat/asc",), heldout={"order:desc": ("vsm/chat/desc",)})
    settings = TrainSettings(search=SearchConfig(popsize=args.popsize, budget=args.budget, subset=0, seed=0),
                             split=split)
    return [RegionJob(resolve(r), settings, str(root / "adapters"), args.model, "cpu", "float32",
                      checkpoint_dir=str(root / "ck"), threads=threads) for r in regions]


def weights(results) -> list[bytes]:
    return [(Path(r.adapter_path) / "adapter_model.safetensors").read_bytes() for r in results]


def registry_times(repeats: int, tmp: Path) -> dict[str, tuple[float, float]]:
    from culign.registry import open_registry, parse_location
    from reliability.backends import seaweedfs

    prompt = torch.randn(8, 576)  # the embedded model's adapter: 8 virtual tokens of width 576
    out = {}
    with seaweedfs(tmp / "weed") as store:
        store.make_bucket("bench")
        os.environ.update(store.env)
        for name, reg in [("local folder", open_registry(tmp / "local")),
                          ("S3 (SeaweedFS, 127.0.0.1)", open_registry("s3://bench/reg", cache_dir=tmp / "cache"))]:
            t = time.perf_counter()
            for _ in range(repeats):
                reg.save("US", prompt, base_model="m", base_fingerprint="f", provenance={})
            save = (time.perf_counter() - t) / repeats
            t = time.perf_counter()
            for v in range(1, repeats + 1):
                if parse_location(reg.root).remote:
                    reg.cache = tmp / f"cold-{v}"  # a cold cache each time: the download is measured
                reg.load("US", v)
            load = (time.perf_counter() - t) / repeats
            out[name] = (save, load)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", default="US,CN,IN,SA")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--repeats", type=int, default=20, help="registry saves and loads per store")
    ap.add_argument("--parts", default="training,registry", help="what to measure: training, registry or both")
    args = ap.parse_args()
    regions = args.regions.split(",")
    print(f"CPU: {platform.processor() or platform.machine()}, torch capability {cpu_capability()}, "
          f"{os.cpu_count()} cores; {len(regions)} regions, budget {args.budget}, popsize {args.popsize}, "
          f"model {args.model or 'embedded SmolLM2-135M-Instruct'} (float32)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "training" in args.parts:
            training(args, regions, tmp)
        if "registry" in args.parts:
            registry_report(args, tmp)


def training(args, regions, tmp: Path) -> None:
    rows = []
    for label, threads, workers in [("sequential 1T", 1, 0), ("ray 1x1", 1, 1), ("sequential 2T", 2, 0),
                                    ("ray 2x1", 1, 2)]:
        root = tmp / label.replace(" ", "-")
        t = time.perf_counter()
        if workers == 0:
            res = run_sequential(jobs(regions, args, root, threads))
            torch.set_num_threads(os.cpu_count() or 1)
        else:
            import ray

            ray.shutdown()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=200 * 2**20)
            res = fan_out(jobs(regions, args, root, threads), cpus_per_region=1)
            ray.shutdown()
        wall = time.perf_counter() - t
        failed = [r.error for r in res if not r.ok]
        if failed:
            raise SystemExit(f"{label}: {failed}")
        rows.append((label, wall, res))
    base1, ray1, base2, ray2 = rows
    same = [weights(base1[2]) == weights(ray1[2]), weights(base1[2]) == weights(ray2[2])]
    print(f"\n{'run':<15}{'wall s':>9}{'per region s':>14}{'vs its baseline':>17}")
    for (label, wall, res), base in zip(rows, [None, base1, None, base2]):
        ratio = "" if base is None else f"{wall / base[1]:.3f}x"
        print(f"{label:<15}{wall:>9.1f}{wall / len(regions):>14.1f}{ratio:>17}")
    overhead = (ray1[1] - base1[1]) / len(regions)
    print(f"\nRay's cost per region task (ray 1x1 - sequential 1T, per region): {overhead:+.1f} s "
          f"({(ray1[1] / base1[1] - 1) * 100:+.1f} %); at equal total cores (ray 2x1 vs sequential 2T): "
          f"{(ray2[1] / base2[1] - 1) * 100:+.1f} % (goal <= +10 %)")
    print(f"adapters byte-identical to the sequential 1-thread run: ray 1x1 {same[0]}, ray 2x1 {same[1]}")
    per_region = base1[1] / len(regions)
    print(f"\nPROJECTION (not a measurement): {len(TABLE)} regions at this budget, {per_region:.0f} s per region "
          "at 1 thread, one region per core:")
    for machines, cores in [(1, 2), (4, 16), (16, 16), (111, 1)]:
        slots = machines * cores
        print(f"  {machines:>3} machines x {cores:>2} cores: {math.ceil(len(TABLE) / slots)} rounds, "
              f"~{math.ceil(len(TABLE) / slots) * (per_region + max(overhead, 0)) / 60:.1f} min")



def registry_report(args, tmp: Path) -> None:
    print(f"\nregistry, one 8 x 576 adapter (mean of {args.repeats} saves / cold loads):")
    times = registry_times(args.repeats, tmp)
    local = times["local folder"]
    for name, (save, load) in times.items():
        print(f"  {name:<28} publish {save * 1000:7.1f} ms ({save / local[0]:5.1f}x)   load {load * 1000:7.1f} ms "
              f"({load / local[1]:5.1f}x)")


if __name__ == "__main__":
    main()
