"""The background logger against a real SQLite store: what it sends, in how many round trips."""

import time

from edm_opt.tracking import RunLogger, metric_history


def test_metrics_are_coalesced_into_one_send_per_interval_and_none_is_lost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger.create(uri, "coalesce", "r", {}, flush_interval=1.0, verbose=False)
    sends = []
    real = logger._client.log_batch

    def counted(*args, **kwargs):  # the real store call, counted
        sends.append(len(kwargs.get("metrics") or []))
        return real(*args, **kwargs)

    logger._client.log_batch = counted
    t0 = time.monotonic()
    for step in range(60):  # 60 steps of 3 scalars over ~1.2 s: ~2 intervals
        logger.log_metrics({"loss/train": step / 10, "train/lr": 0.01, "perf/img_per_s": 100 + step}, step)
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert logger.flush(timeout=30)
    assert logger.finish()
    assert sum(sends) == 180
    assert len(sends) <= elapsed / 1.0 + 2, sends  # one send per second (plus the first and the flush), not per step
    history = metric_history(uri, logger.run_id, "loss/train")
    assert [step for step, _ in history] == list(range(60))
