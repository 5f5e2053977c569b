"""Screenshots of the MLflow UI for the README, from a real browser: headless Chromium driven over its DevTools
protocol (aiohttp, which MLflow installs), against an `mlflow server` on 127.0.0.1 reading a local store.

    python docs/mlflow_ui_screenshots.py --store demo-out/mlflow.db --run edm2-nano-optimal-s0-...  # a demo run
    python docs/mlflow_ui_screenshots.py --train                     # trains a short digits run first (~3 min)

writes docs/mlflow-ui/run-page.png (the run's overview: description, dataset, source, tags, metrics) and
docs/mlflow-ui/images.png (the model-metrics tab filtered to the images, the gap_curve panel full screen at the
run's last step, with its step slider). The UI is put in "Model training" mode, as the README tells a reader to do. Needs `chromium`
(Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import mlflow

from edm_opt import contract as C

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "mlflow-ui"
# The UI's own local-storage keys (MLflow 3.x: `<key>_v<version>`): Model training mode, the assistant panel closed
LOCAL_STORAGE = {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.panelOpen_v1": False,
                 "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}
WINDOW = (1500, 1150)
# The full-screen button of the first visible chart card: the button just before the card's menu
EXPAND_FIRST_CARD = """(() => {
  const buttons = Array.from(document.querySelectorAll('button')).filter(b => b.offsetParent !== null);
  const menu = buttons.findIndex(b => b.dataset.testid === 'experiment-view-compare-runs-card-menu');
  buttons[menu - 1].click();
})()"""
LAST_STEP_INPUT = """(() => {
  const box = Array.from(document.querySelectorAll('input[type=number]')).filter(b => b.offsetParent !== null).pop();
  box.focus(); box.select();
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    start = time.time()
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.time() - start > timeout:
                raise SystemExit(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(0.5)


def train_run(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    """A short digits run with the optimal schedule (the issue's example), images at 4 statuses and 2 snapshots."""
    subprocess.run([sys.executable, "-m", "edm_opt.cli", "train", "--data", "digits", "--preset", "edm2-nano",
                    "--schedule", "optimal", "--duration", "8Ki", "--status-every", "1Ki", "--snapshot-every", "4Ki",
                    "--run-name", "digits-edm2-nano-optimal"], cwd=workdir, check=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"})
    return workdir / "mlflow.db"


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.id = ws, 0

    async def call(self, method: str, **params):
        self.id += 1
        await self.ws.send_json({"id": self.id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def goto(self, url: str, settle: float, text: str | None = None, timeout: float = 120) -> None:
        """Open `url`, wait until the page shows `text` (the UI fetches runs, metrics and images after load), then
        `settle` seconds more for the charts."""
        await self.call("Page.navigate", url=url)
        start = time.time()
        while text and not (await self.call("Runtime.evaluate", expression=(
                f"document.body.innerText.includes({json.dumps(text)})")))["result"].get("value"):
            if time.time() - start > timeout:
                raise SystemExit(f"{url} did not show {text!r} within {timeout:.0f} s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(settle)

    async def shot(self, path: Path) -> None:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(base64.b64decode(data))
        tmp.rename(path)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


async def screenshots(base: str, experiment_id: str, run_id: str, last_step: int, devtools: str, settle: float) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{devtools}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                            deviceScaleFactor=1, mobile=False)
            await page.goto(base + "/", 3)
            setters = ";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))})"
                               for k, v in LOCAL_STORAGE.items())
            await page.call("Runtime.evaluate", expression=setters)
            run = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
            await page.goto(run + "?workflowType=machine_learning", settle, text="About this run")
            await page.shot(OUT / "run-page.png")
            await page.goto(run + "/model-metrics?workflowType=machine_learning", settle, text="flops_total")
            await page.call("Runtime.evaluate", expression=(  # the chart filter: only the image panels
                "document.querySelector('input[placeholder=\"Search metric charts\"]').focus()"))
            await page.call("Input.insertText", text="gap_curve|samples")
            await asyncio.sleep(settle)
            await page.call("Runtime.evaluate", expression=EXPAND_FIRST_CARD)  # gap_curve, full screen
            await asyncio.sleep(2)
            await page.call("Runtime.evaluate", expression=LAST_STEP_INPUT)  # the step box: the run's last step
            await page.call("Input.insertText", text=str(last_step))
            await page.call("Runtime.evaluate", expression="document.activeElement.blur()")  # the box commits on blur
            await asyncio.sleep(settle)
            await page.shot(OUT / "images.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="an mlflow.db (e.g. demo-out/mlflow.db)")
    ap.add_argument("--run", help="run name (default: the newest finished run)")
    ap.add_argument("--train", action="store_true",
                    help="train a short digits run first, into --store's folder (default: a temporary one)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to let each page draw once its data is there")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.train:
            store = train_run(args.store.parent if args.store else tmp)
        else:
            store = args.store
        if store is None or not Path(store).is_file():
            raise SystemExit(f"no MLflow store {store}: pass --store PATH/mlflow.db or --train")
        uri = f"sqlite:///{Path(store).resolve()}"
        runs = mlflow.MlflowClient(uri).search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()],
            filter_string=f"attributes.run_name = '{args.run}'" if args.run else "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no run {args.run or '(finished)'} in {store}")
        run = runs[0]
        port, dport = free_port(), free_port()
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--remote-debugging-port={dport}", f"--user-data-dir={tmp / 'chromium'}",
                                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base, devtools = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dport}"
            wait_http(base + "/health")
            wait_http(devtools + "/json/version")
            OUT.mkdir(parents=True, exist_ok=True)
            last_step = max(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, C.FLOPS_TOTAL))
            asyncio.run(screenshots(base, run.info.experiment_id, run.info.run_id, last_step, devtools, args.settle))
        finally:
            for p in (browser, server):
                p.terminate()
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
