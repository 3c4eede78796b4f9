"""Many regions at once: one Ray task per region around the unchanged single-region training (culign.trainer).

- A region's task loads the model, trains exactly as ``culign train --region R`` does and publishes to the
  registry (a folder every worker sees, or ``s3://``). At the same thread count the adapter is bit-identical to
  a run alone: the task sets torch's threads to its CPUs, and nothing else differs.
- A worker that dies (SIGKILL, OOM, a lost node) is retried: the driver submits the region again as its next
  attempt, which resumes from the region's checkpoint (the search writes one after every generation), so the result
  equals an uninterrupted run. The driver, not Ray, counts attempts: a task that blocked on ``ray.get`` to learn its
  attempt number would hand its CPUs back to Ray while it waited, and Ray would start the next region on them, so
  more regions ran than the cluster has CPUs for (measured: two 2-CPU regions at once on a 2-CPU machine, each at a
  third of its speed).
  Checkpoints go to ``checkpoint_dir``: a folder every worker sees, or an object-store URL (synced after each
  generation).
- Progress comes back through a small actor (the board): generation, best loss and ETA per region.
- A region that fails is reported with its error; the others go on.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .targets import Target
from .trainer import TrainSettings


# Ray's switch for multi-machine networking: at 0 every address is the loopback one, which is what a cluster on
# this machine needs (else Ray turns 127.0.0.1 into the interface address and cannot reach its own GCS). Read when
# ray is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PAUSE_ENV = "CULIGN_FANOUT_TEST_PAUSE_S"  # test seam: sleep after each generation, so a test can kill a task there


class FanoutError(Exception):
    """A usage problem of the fan-out (no Ray, an unreachable cluster): the message says what to do."""


@dataclass(frozen=True)
class RegionJob:
    """Everything one region's training needs, picklable (it travels to a Ray worker)."""
    target: Target
    settings: TrainSettings
    adapters: str  # registry: a folder or an object-store URL
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    wording_files: tuple[str, ...] = ()
    checkpoint_dir: str | None = None  # a folder or an object-store URL; None: the default cache folder
    resume: bool = False
    threads: int = 1
    gate: dict = field(default_factory=dict)  # how the validity check gated the run (readout, validity, forced_invalid,
    # order_balanced: culign.trainer.train's keywords), decided once before the fan-out


@dataclass
class RegionResult:
    region: str
    ok: bool
    error: str | None = None
    adapter: str | None = None  # REGION@version
    adapter_path: str | None = None
    train_loss: float | None = None
    heldout_loss: float | None = None
    gain_kept: float | None = None
    wall_s: float = 0.0
    attempts: int = 1
    interrupted: bool = False
    started_at: float | None = None  # wall clock (time.time()) when the region's last attempt began
    verdict: str | None = None  # the adapter's post-training verdict (culign.verdict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Status:
    """One region's live state, as the board holds it."""
    region: str
    state: str = "waiting"  # waiting | running | done | failed
    generation: int = 0
    generations: int = 0
    best_loss: float | None = None
    eta_s: float | None = None
    attempt: int = 0
    pid: int | None = None
    stage: str = ""  # before and after the search: "baselines", "scoring the result" ("": the search)
    stage_done: int = 0  # presentations of the stage scored so far, of stage_total
    stage_total: int = 0
    outcome: str = ""  # once done or failed: the result in a few words (held-out L1, verdict, wall) or the error


# ---------------------------------------------------------------------------------------------------- checkpoints
class _CheckpointSync:
    """A region's checkpoints in an object store: downloaded before the run, uploaded after every generation.
    The search writes to a local folder as always; the store holds the copy a retry on another machine reads."""

    def __init__(self, url: str, region: str, local: Path):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url.rstrip("/"))
        self.region, self.local = region, local
        local.mkdir(parents=True, exist_ok=True)

    def download(self) -> None:
        for key in self.fs.glob(f"{self.root}/{self.region}-*.json"):
            (self.local / key.rsplit("/", 1)[1]).write_bytes(self.fs.cat_file(key))

    def upload(self, checkpoint: Path) -> None:
        if checkpoint.exists():
            self.fs.pipe_file(f"{self.root}/{checkpoint.name}", checkpoint.read_bytes())

    def finish(self, completed: bool) -> None:
        """A completed run's checkpoints go (as the search removes its own); a cut one (time limit, Ctrl-C) keeps
        its latest in the store for --resume."""
        for ck in self.local.glob(f"{self.region}-*.json"):
            self.upload(ck)
        if completed:
            for key in self.fs.glob(f"{self.root}/{self.region}-*.json"):
                self.fs.rm_file(key)


# ---------------------------------------------------------------------------------------------------- one region
def run_region(job: RegionJob, report: Callable[[dict], None] | None = None, attempt: int = 1) -> RegionResult:
    """Train one region, the same steps as ``culign train`` (no progress bars: ``report`` gets the live state).
    A second attempt always resumes from the region's checkpoint."""
    import torch

    from . import defaults
    from .model import Runtime
    from .registry import open_registry, parse_location
    from .survey import Survey
    from .trainer import train

    t0, started_at = time.perf_counter(), time.time()
    region = job.target.key
    torch.set_num_threads(job.threads)
    sync = None
    # the driver resolved them already; the worker resolves again with the driver's CULIGN_* environment (copied to
    # every task) so that a RegionJob built by hand runs with the same defaults as the CLI
    where = defaults.resolve(model=job.model, device=job.device, dtype=job.dtype)
    remote = bool(job.checkpoint_dir) and parse_location(job.checkpoint_dir).remote
    checkpoint_dir = Path(job.checkpoint_dir) if job.checkpoint_dir and not remote else None
    if remote:
        checkpoint_dir = where.cache / "runs-synced" / f"{region}-{os.getpid()}"
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        sync = _CheckpointSync(job.checkpoint_dir, region, checkpoint_dir)
        sync.download()
    resume = job.resume or attempt > 1
    cfg = job.settings.search
    generations = max(1, cfg.budget // cfg.popsize)

    pause = float(os.environ.get(PAUSE_ENV) or 0)

    def on_generation(p, checkpoint: Path):
        if pause:
            time.sleep(pause)
        if sync is not None:
            sync.upload(checkpoint)
        if report is not None:
            per = p.elapsed_s / max(p.generation, 1)
            report({"state": "running", "generation": p.generation, "generations": generations, "stage": "",
                    "best_loss": p.best_loss, "eta_s": per * max(generations - p.generation, 0)})

    def on_stage(stage: str, done: int, total: int):
        if report is not None:
            report({"state": "running", "stage": stage, "stage_done": done, "stage_total": total})

    rt = Runtime.load(where.model, device=where.device, dtype=where.dtype, scoring=True)
    survey = Survey.load(wording_files=list(job.wording_files))
    outcome = train(rt, survey, job.target, job.settings, open_registry(job.adapters), checkpoint_dir=checkpoint_dir,
                    resume=resume, progress=False, echo=lambda _m: None, on_generation=on_generation,
                    on_stage=on_stage, **job.gate)
    if sync is not None:
        sync.finish(outcome.report.get("stopped_by") == "budget")
    r = outcome.report
    return RegionResult(region, True, adapter=outcome.adapter.ref, adapter_path=str(outcome.adapter.path),
                        train_loss=r.get("train_loss"), heldout_loss=r.get("heldout_loss"),
                        gain_kept=r.get("gain_kept"), wall_s=time.perf_counter() - t0, attempts=attempt,
                        interrupted=bool(r.get("interrupted")), verdict=r["verdict"]["verdict"],
                        started_at=started_at)


def _failure(region: str, error: BaseException | str, t0: float, attempts: int = 1) -> RegionResult:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return RegionResult(region, False, error=text.strip().splitlines()[-1][:400] if text.strip() else "failed",
                        wall_s=time.perf_counter() - t0, attempts=attempts)


def run_sequential(jobs: list[RegionJob], on_update: Callable[[dict[str, Status]], None] | None = None
                   ) -> list[RegionResult]:
    """The same jobs one after another in this process: the baseline the fan-out is measured and tested against."""
    statuses = {j.target.key: Status(j.target.key) for j in jobs}
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        st = statuses[job.target.key]

        def report(d, st=st):
            st.__dict__.update(d)
            if on_update:
                on_update(statuses)

        try:
            results.append(run_region(job, report))
        except Exception as e:  # one region's failure never stops the others
            results.append(_failure(job.target.key, e, t0))
        _finish(st, results[-1])
        if on_update:
            on_update(statuses)
    return results


def _finish(st: Status, result: RegionResult) -> None:
    """A region's line says how it ended: the held-out L1 and verdict, or the error."""
    st.state, st.stage = ("done" if result.ok else "failed"), ""
    if result.ok:
        held = f"{result.heldout_loss:.2f}" if result.heldout_loss is not None else "-"
        st.outcome = f"held-out L1 {held}  {result.verdict or ''}  {_fmt_eta(result.wall_s)}"
    else:
        st.outcome = result.error or "failed"


# ---------------------------------------------------------------------------------------------------- Ray
def _ray():
    try:
        import ray
    except ImportError:
        raise FanoutError("--regions trains on Ray, which is not installed: pip install 'culign[scale]'") from None
    return ray


def check_address(address: str | None) -> None:
    """A cluster address that is malformed or where nothing answers is a FanoutError at once (ray.init would retry
    an unreachable address for minutes)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise FanoutError(f"--ray-address {address!r} is not HOST:PORT (or 'auto')")
    import socket

    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise FanoutError(f"no Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at ``address`` (or $RAY_ADDRESS), or start a local one on demand."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address.removeprefix("ray://").split(":")[0] in ("127.0.0.1", "localhost"):
        os.environ.setdefault(LOOPBACK_ENV, "0")  # this machine only: stay on loopback
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        check_address(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FanoutError(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=200 * 2**20, **kwargs)
    return ray


def _board_class(ray):
    @ray.remote(num_cpus=0)
    class Board:
        """Live state per region, written by the tasks, read by the driver. Lives outside the task workers, so
        it counts attempts across a worker's death."""

        def __init__(self):
            self.state: dict[str, dict] = {}

        def start(self, region: str, pid: int, attempt: int) -> None:
            self.state.setdefault(region, {}).update(state="running", attempt=attempt, pid=pid)

        def update(self, region: str, values: dict) -> None:
            self.state.setdefault(region, {"attempt": 1}).update(values)

        def snapshot(self) -> dict[str, dict]:
            return {k: dict(v) for k, v in self.state.items()}

    return Board


def _task(job: RegionJob, board, attempt: int) -> RegionResult:
    board.start.remote(job.target.key, os.getpid(), attempt)  # not awaited: see the module's docstring
    return run_region(job, lambda d: board.update.remote(job.target.key, d), attempt)


def fan_out(jobs: list[RegionJob], *, ray_address: str | None = None, cpus_per_region: float = 1,
            gpus_per_region: float = 0, max_retries: int = 3,
            on_update: Callable[[dict[str, Status]], None] | None = None, poll_s: float = 0.5,
            started: Callable[[object], None] | None = None) -> list[RegionResult]:
    """Run every job as a Ray task; returns one RegionResult per job, in order (failures included). A region
    whose worker is lost is submitted again, resuming, up to ``max_retries`` times.

    Ctrl-C cancels every task (each keeps its checkpoint: ``resume=True`` continues them) and re-raises.
    """
    ray = connect(ray_address, num_cpus=None)
    board = _board_class(ray).remote()
    if started is not None:
        started(board)
    # the driver's culign settings (cache folders, the answer cache, test seams) and AWS environment reach the
    # tasks, wherever the cluster was started from
    env = {k: v for k, v in os.environ.items() if k.startswith(("CULIGN_", "AWS_", "HF_"))}
    # max_retries=0: a lost worker comes back here and is submitted again as the region's next attempt (the
    # module's docstring says why the driver counts them)
    remote = ray.remote(num_cpus=cpus_per_region, num_gpus=gpus_per_region, max_retries=0,
                        retry_exceptions=False)(_task).options(runtime_env={"env_vars": env})
    t0 = time.perf_counter()
    refs = {remote.remote(job, board, 1): (job, 1) for job in jobs}
    results: dict[str, RegionResult] = {}
    statuses = {j.target.key: Status(j.target.key) for j in jobs}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
            snap = ray.get(board.snapshot.remote())
            for region, values in snap.items():
                st = statuses.get(region)
                if st is not None and st.state not in ("done", "failed"):
                    st.__dict__.update({k: v for k, v in values.items() if k in st.__dict__})
            for ref in ready:
                job, attempt = refs.pop(ref)
                region = job.target.key
                try:
                    results[region] = ray.get(ref)
                    _finish(statuses[region], results[region])
                except (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError) as e:  # raised: no retry
                    results[region] = _failure(region, _error_text(getattr(e, "cause", None) or e), t0, attempt)
                    _finish(statuses[region], results[region])
                except ray.exceptions.RayError as e:  # the worker or its node was lost: resume, if attempts are left
                    if attempt <= max_retries:
                        retry = remote.remote(job, board, attempt + 1)
                        refs[retry] = (job, attempt + 1)
                        pending.append(retry)
                        statuses[region].state = "waiting"
                    else:
                        results[region] = _failure(region, _error_text(e), t0, attempt)
                        _finish(statuses[region], results[region])
            if on_update:
                on_update(statuses)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=False)  # the task's search sees KeyboardInterrupt: checkpoint kept
        ray.wait(pending, num_returns=len(pending), timeout=60)
        raise
    return [results[j.target.key] for j in jobs]


def _error_text(error: BaseException) -> str:
    text = str(error)
    if "Traceback" in text:  # a RayTaskError's text holds the remote traceback: its last line is the error
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def kill_task_worker(pid: int) -> None:
    """SIGKILL a task's worker process (the fault the tests inject)."""
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- display
def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def status_line(st: Status) -> str:
    if st.state == "waiting":
        return f"{st.region:<8} waiting for a worker"
    best = f"{st.best_loss:.2f}" if st.best_loss is not None else "-"
    retry = f" (attempt {st.attempt})" if st.attempt and st.attempt > 1 else ""
    if st.state in ("done", "failed") and st.outcome:
        return f"{st.region:<8} {st.state:<8} {st.outcome}{retry}"
    if st.state == "running" and st.stage:
        return f"{st.region:<8} running  {st.stage} {st.stage_done}/{st.stage_total}{retry}"
    return (f"{st.region:<8} {st.state:<8} gen {st.generation}/{st.generations or '?'}  best L1 {best}  "
            f"ETA {_fmt_eta(st.eta_s)}{retry}")


class LiveLines:
    """One line per region, redrawn in place on a terminal; on a pipe, a line when a region's generation changes
    (or its stage, at each tenth)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.drawn, self.last = stream, 0, {}
        self.tty = stream.isatty()

    def __call__(self, statuses: dict[str, Status]) -> None:
        lines = [status_line(s) for s in statuses.values()]
        if self.tty:
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F")
            self.stream.write("".join(f"\x1b[2K{ln}\n" for ln in lines))
            self.drawn = len(lines)
        else:
            for s, ln in zip(statuses.values(), lines):
                # a stage prints at each tenth of it, not at every presentation
                tenth = 10 * s.stage_done // s.stage_total if s.stage_total else 0
                key = (s.state, s.generation, s.attempt, s.stage, tenth)
                if self.last.get(s.region) != key:
                    self.last[s.region] = key
                    self.stream.write(ln + "\n")
        self.stream.flush()


def results_table(results: list[RegionResult]) -> str:
    def num(x, fmt="{:.2f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "-"

    head = (f"{'region':<8} {'status':<8} {'train L1':>8} {'held-out':>8} {'gain kept':>9} {'wall':>8} {'tries':>5}  "
            f"{'verdict':<34}adapter")
    rows = [head, "-" * len(head)]
    for r in results:
        status = "ok" if r.ok and not r.interrupted else ("cut" if r.ok else "FAILED")
        where = f"{r.adapter} -> {r.adapter_path}" if r.ok else (r.error or "")
        rows.append(f"{r.region:<8} {status:<8} {num(r.train_loss):>8} {num(r.heldout_loss):>8} "
                    f"{num(r.gain_kept, '{:.0%}'):>9} {r.wall_s:>7.0f}s {r.attempts:>5}  {r.verdict or '-':<34}{where}")
    return "\n".join(rows)

