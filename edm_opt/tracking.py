"""MLflow, and only here: run lifecycle, the naming contract, buffered background logging, and reading.

Writing (rank 0 of a training run, evaluate, diagnose, sweeps): `RunLogger` owns one MLflow run. Metrics,
tags and artifacts go into a queue that a background thread sends in batches; if the tracking server is
unreachable, training goes on, the thread retries with exponential backoff and says so on stderr, and
nothing is lost: what is still queued at a checkpoint is saved in it, and what is queued when the run ends
while the server is down is written to `pending-metrics.json` in the run directory and sent on the next
start.

Store: `MLFLOW_TRACKING_URI` if set (e.g. a team server), else `sqlite:///<cwd>/mlflow.db`; artifacts of
experiments created on a SQLite store go to `<db folder>/mlartifacts/<experiment>`.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from . import EdmOptError, __version__
from . import contract as C

# Our thread retries with backoff; MLflow's own retries (7, backoff 2: minutes) would block a flush.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it configures its loggers
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # readers download many small files

MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
PENDING_FILE = "pending-metrics.json"


class TrackingError(EdmOptError, RuntimeError):
    """The tracking store could not be used at all (e.g. unreachable when a run must be created)."""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


_READY: set[str] = set()  # SQLite stores this process has opened (their schema exists)


def _client(uri: str):
    """An MlflowClient. A SQLite store is first opened under an exclusive lock on `<db>.lock`: MLflow creates and
    migrates the schema on first use, and two processes doing that at once leave a half-migrated, unusable file."""
    from mlflow.tracking import MlflowClient  # mlflow: slow to import, only where the store is used

    db = sqlite_path(uri)
    if db is None or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)  # creates or migrates the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)
    return client


def git_commit() -> str:
    """The edm-opt source's git commit, or 'unknown' (e.g. installed from a wheel)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def get_or_create_experiment(client, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:
        location = str(db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """One MLflow run, written from a background thread in batches; never raises into training."""

    def __init__(self, uri: str, run_id: str, pending_path: Path | None = None, skip_until_step: int = -1,
                 flush_interval: float = 5.0, verbose: bool = True, attached: bool = True):
        self.uri, self.run_id = uri, run_id
        self.pending_path = pending_path
        self.skip_until_step = skip_until_step  # after a resume: steps already in the store are not sent again
        self._attached = attached  # False: a resume while the store was down, completed by the thread later
        self.flush_interval = flush_interval
        self.verbose = verbose
        self._client = _client(uri)
        self._ops: deque = deque()  # ("metric", key, value, ts, step) | ("tags", dict) | ("artifact", path, dir)
        self._cv = threading.Condition()
        self._stop = False
        self._down_since: float | None = None
        self._sent = 0
        self._last_drain = 0.0  # monotonic time the thread last started sending the queue (once per interval)
        self._urgent = False  # a flush or the end waits: send without pausing
        self._thread = threading.Thread(target=self._worker, name="edm-opt-mlflow", daemon=True)
        self._thread.start()
        self._monitor = None
        if pending_path is not None and pending_path.exists():
            self.restore_pending(json.loads(pending_path.read_text()))
            pending_path.unlink()

    # creation ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, tags: dict, parent_run_id: str | None = None,
               **kwargs) -> "RunLogger":
        """Start a new run (synchronously: without a store there is no run to train into)."""
        try:
            client = _client(uri)
            exp_id = get_or_create_experiment(client, uri, experiment)
            tags = {**tags, C.TAG_VERSION: __version__}
            if parent_run_id:
                tags[C.TAG_PARENT] = parent_run_id
            run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        except Exception as e:
            raise TrackingError(f"cannot create an MLflow run at {uri} ({type(e).__name__}: {e})") from None
        return cls(uri, run.info.run_id, **kwargs)

    @classmethod
    def resume(cls, uri: str, run_id: str, **kwargs) -> "RunLogger":
        """Continue an existing run; steps at or below its last logged `loss/train` step are not re-sent. With the
        store unreachable, training goes on: everything is buffered and the thread attaches when it is back."""
        logger = cls(uri, run_id, attached=False, **kwargs)
        try:
            attached = logger._attach()
        except TrackingError:
            logger._stop_thread()
            raise
        if not attached:
            logger._say(f"cannot reach {uri} to resume MLflow run {run_id}; training continues, metrics are "
                        f"buffered and sent when the store is back")
        return logger

    def _attach(self) -> bool:
        """Resume the run in the store: its last logged step, status RUNNING; drop buffered steps it already has."""
        try:
            history = self._client.get_metric_history(self.run_id, C.LOSS_TRAIN)
            self._client.update_run(self.run_id, status="RUNNING")
        except Exception as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":  # answered, and the run is gone
                raise TrackingError(f"cannot resume MLflow run {self.run_id} at {self.uri}: it does not exist "
                                    f"(deleted?); use --restart or another --run-name") from None
            return False
        with self._cv:
            self.skip_until_step = max((m.step for m in history), default=-1)
            self._ops = deque(op for op in self._ops if op[0] != "metric" or op[4] > self.skip_until_step)
            self._attached = True
            self._cv.notify_all()
        return True

    def _attach_quietly(self) -> bool:
        try:
            return self._attach()
        except TrackingError as e:  # the run vanished while training: say so, keep buffering
            self._say(str(e))
            return False

    def _stop_thread(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def down(self) -> bool:
        """The store did not answer the last attempt (a flush now would wait for nothing)."""
        return self._down_since is not None or not self._attached

    # writing --------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: int) -> None:
        if step <= self.skip_until_step:
            return
        ts = int(time.time() * 1000)
        items = [("metric", k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None
                 and math.isfinite(float(v))]
        with self._cv:
            self._ops.extend(items)
            self._cv.notify()

    def log_params(self, params: dict) -> None:
        """Params are written synchronously, once (MLflow refuses changed values)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        with self._cv:
            self._ops.append(("tags", {k: str(v) for k, v in tags.items()}))
            self._cv.notify()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file; it is read when sent, so write a fresh file (atomically) rather than edit one."""
        with self._cv:
            self._ops.append(("artifact", str(path), artifact_path))
            self._cv.notify()

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """Queue a PNG as an MLflow image under `key` at `step` (the UI's image panel shows it with a step slider);
        read now, so the file may be rewritten for the next step."""
        if step <= self.skip_until_step:
            return
        data = Path(path).read_bytes()
        with self._cv:
            self._ops.append(("image", data, key, int(step)))
            self._cv.notify()

    def start_system_metrics(self, interval_s: float = 10.0, resume: bool = False) -> bool:
        """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) in its own thread,
        logging `system/*` into this run; False (and a line on stderr) if it cannot start."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=resume,
                                                 tracking_uri=self.uri)
            self._monitor.start()
            return True
        except Exception as e:
            self._say(f"system metrics not monitored ({type(e).__name__}: {e})")
            self._monitor = None
            return False

    def log_dataset(self, name: str, digest: str, source: dict, profile: dict, context: str = "training") -> None:
        """The run's dataset as an MLflow input (the run page's Dataset field), synchronously, once."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps(source),
                     profile=json.dumps(profile))
        self._client.log_inputs(self.run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def pending(self) -> list:
        """Metrics not yet sent, as primitive lists (what a checkpoint stores)."""
        with self._cv:
            return [list(op[1:]) for op in self._ops if op[0] == "metric"]

    def restore_pending(self, items: list) -> None:
        with self._cv:
            for key, value, ts, step in items:
                if step > self.skip_until_step:
                    self._ops.append(("metric", key, value, ts, step))
            self._cv.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is sent (True) or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._urgent = True
            self._cv.notify_all()
            try:
                while self._ops:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(timeout=0.2 if left is None else min(0.2, left))
            finally:
                self._urgent = False
        return True

    def finish(self, status: str = "FINISHED", timeout: float = 300.0) -> bool:
        """Send what is queued, mark the run `status`, stop the thread. If the store stays unreachable for
        `timeout` seconds, the queued metrics go to `pending-metrics.json` (sent at the next start)."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
        ok = self.flush(timeout) and self._attached
        self._stop_thread()
        if ok:
            try:
                self._client.set_terminated(self.run_id, status)
                return True
            except Exception as e:
                self._say(f"could not mark the run {status} ({type(e).__name__}: {e})")
        left = self.pending()
        if left and self.pending_path is not None:
            from .fileio import write_json

            write_json(self.pending_path, left, indent=None)
            self._say(f"tracking store unreachable: {len(left)} metrics saved to {self.pending_path}; "
                      f"re-run the same command to send them")
        return False

    # the thread -----------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"[edm-opt tracking] {msg}", file=sys.stderr, flush=True)

    def _take(self) -> list:
        with self._cv:
            if not self._ops:
                return []
            first = self._ops[0]
            if first[0] != "metric":
                return [first]
            batch = []
            for op in self._ops:
                if op[0] != "metric" or len(batch) == MAX_BATCH:
                    break
                batch.append(op)
            return batch

    def _send(self, batch: list) -> None:
        from mlflow.entities import Metric

        kind = batch[0][0]
        if kind == "metric":
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for _, k, v, ts, s in batch])
        elif kind == "tags":
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in batch[0][1].items()])
        elif kind == "image":
            from PIL import Image

            _, data, key, step = batch[0]
            with Image.open(io.BytesIO(data)) as im:
                self._client.log_image(self.run_id, im.copy(), key=key, step=step, synchronous=True)
        else:
            self._client.log_artifact(self.run_id, batch[0][1], batch[0][2])

    def _worker(self) -> None:
        backoff, draining, quota = 1.0, False, 0  # quota: items queued when this drain began
        while True:
            with self._cv:  # coalesce: drain once per flush_interval; at once for a flush, the end, a full batch
                while not self._stop and not self._urgent and not draining:
                    wait = self.flush_interval - (time.monotonic() - self._last_drain)
                    if self._ops and (wait <= 0 or len(self._ops) >= MAX_BATCH):
                        break
                    self._cv.wait(timeout=self.flush_interval if not self._ops else wait)
                if self._stop and (not self._ops or self._down_since is not None):
                    return
            if not draining:
                self._last_drain = time.monotonic()
                with self._cv:
                    quota = len(self._ops)
            batch = self._take()
            if not batch:
                continue
            try:
                if not self._attached and not self._attach_quietly():
                    raise ConnectionError("the run is not resumed in the store yet")
                self._send(batch)
            except FileNotFoundError as e:  # an artifact that vanished: drop it, keep going
                self._say(f"artifact skipped ({e})")
            except Exception as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self._say(f"tracking store unreachable ({type(e).__name__}); training continues, "
                              f"{len(self._ops)} items buffered, retrying")
                with self._cv:
                    if self._stop:
                        return
                    self._cv.wait(timeout=backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            with self._cv:
                for _ in batch:
                    self._ops.popleft()
                self._sent += len(batch)
                quota -= len(batch)
                draining = quota > 0 and bool(self._ops)  # what arrived since waits for the next interval
                self._cv.notify_all()
            if self._down_since is not None:
                self._say(f"tracking store reachable again after {time.monotonic() - self._down_since:.0f} s; "
                          f"sending the buffer ({len(self._ops) + len(batch)} items)")
                self._down_since = None
            backoff = 1.0


# --------------------------------------------------------------------------------------------------
# Reading (reports, diagnose --runs, sweeps)


@dataclass
class RunRecord:
    """What readers need of one MLflow run: identity, status, params, tags, latest metrics."""

    run_id: str
    run_name: str
    status: str
    params: dict
    tags: dict
    metrics: dict
    start_time: int | None
    end_time: int | None
    artifact_uri: str


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name, run.info.status, dict(run.data.params), dict(run.data.tags),
                     dict(run.data.metrics), run.info.start_time, run.info.end_time, run.info.artifact_uri)


def find_runs(uri: str, experiment: str, parent_run_id: str | None = None, filter_string: str = "") -> list[RunRecord]:
    """Runs of an experiment (children of `parent_run_id` only, when given), oldest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}")
    filters = [f for f in (filter_string, f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else "") if f]
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], " and ".join(filters), max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [_record(r) for r in runs]


def get_run(uri: str, run_id: str) -> RunRecord:
    try:
        return _record(_client(uri).get_run(run_id))
    except Exception as e:
        raise TrackingError(f"no MLflow run {run_id} at {uri} ({type(e).__name__})") from None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def load_json_artifact(uri: str, run_id: str, path: str) -> dict | None:
    """A run's JSON artifact (e.g. per_sigma.json), or None if it has none."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = _client(uri).download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception:
        return None


def create_run(uri: str, experiment: str, run_name: str, tags: dict | None = None,
               parent_run_id: str | None = None) -> str:
    """A run that a tool fills synchronously (sweep parents, diagnose): its id."""
    client = _client(uri)
    exp_id = get_or_create_experiment(client, uri, experiment)
    tags = {**(tags or {}), C.TAG_VERSION: __version__}
    if parent_run_id:
        tags[C.TAG_PARENT] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}).info.run_id


def set_run_status(uri: str, run_id: str, status: str) -> None:
    """Mark a run FAILED/KILLED/FINISHED/RUNNING; never raises (used on the way out)."""
    try:
        client = _client(uri)
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status)
    except Exception:
        pass


def log_now(uri: str, run_id: str, metrics: dict | None = None, step: int = 0, params: dict | None = None,
            tags: dict | None = None, artifacts: list | None = None) -> None:
    """Synchronous logging for short tools (evaluate, diagnose, sweeps, report); raises TrackingError."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client(uri)
    ts = int(time.time() * 1000)
    try:
        ms = [Metric(k, float(v), ts, int(step)) for k, v in (metrics or {}).items()]
        for i in range(0, len(ms), MAX_BATCH):
            client.log_batch(run_id, metrics=ms[i:i + MAX_BATCH])
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ts_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ps), len(ts_)), 100):
            client.log_batch(run_id, params=ps[i:i + 100], tags=ts_[i:i + 100])
        for item in artifacts or []:
            path, folder = item if isinstance(item, tuple) else (item, None)
            client.log_artifact(run_id, str(path), folder)
    except Exception as e:
        raise TrackingError(f"logging to MLflow run {run_id} at {uri} failed ({type(e).__name__}: {e})") from None
