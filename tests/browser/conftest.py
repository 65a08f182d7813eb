"""A live cluster and a headless Chromium for the dashboard's browser tests.

The cluster (one per module): a real ``tokiwa-worker run`` process with the HTTP API (and so
the dashboard, with a bearer token) and a Miclow relay inside, a ``tokiwa-producer run``
process (the cron leader; it also has a workflow the worker lacks, so that route's group
waits), a standalone ``tokiwa-producer dashboard`` without a token (read-only), and events
published so every page has something to show: a succeeded DAG run, a failed run, a running
chatflow turn holding its conversation lock, dead letters (two of a broken subscriber, one of
the failed run: the worker acks on success only, with one delivery), a delayed event.

The browser is Debian's ``chromium`` driven by ``/usr/bin/chromedriver`` through selenium.
When either is missing the tests fail (they never skip): ``make test`` installs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.app import Orchestrator
from orchestrator.keys import Keys
from tests.integration.procs import ROOT, start_worker, stop, wait_until, worker_env

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APP = "tests.browser.dash_app:app"
TOKEN = "dash-s3cret"
PUPPET = ROOT / "examples" / "relay" / "puppet.py"
RELAY_TOPICS = ["orders.paid", "greetings"]
WIDTH, HEIGHT = 1440, 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, *, method: str = "GET", token: str | None = None, body: Any = None,
         timeout: float = 5.0) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def serving(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return http(url, timeout=1.0)[0] == 200
        except OSError:
            return False
    return probe


@dataclass
class Cluster:
    redis_url: str
    namespace: str
    keys: Keys
    client: redis.Redis
    dashboard: str  # the worker's HTTP API dashboard (token configured)
    readonly: str  # the standalone dashboard (no token)
    out: Path
    poison: Path
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def dead_ids(self, group: str | None = None) -> list[str]:
        """Dead letter ids, oldest first (only ``group``'s when given)."""
        return [i.decode() for i, f in self.client.xrange(self.keys.dead)
                if group is None or f.get(b"group", b"").decode() == group]

    def runs(self) -> list[dict[str, Any]]:
        status, rows = http(self.dashboard + "api/runs?limit=200")
        assert status == 200, rows
        return list(rows["runs"])

    def run_of(self, workflow: str, status: str | None = None) -> dict[str, Any] | None:
        return next((r for r in self.runs() if r["workflow"] == workflow and (status is None or r["status"] == status)),
                    None)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.logs[name].read_text()[-3000:]}")


def _relay_toml(path: Path) -> Path:
    path.write_text(
        "shutdown_grace_s = 1.0\nheartbeat_interval_s = 1.0\n"
        f'[[tasks]]\ntask_name = "puppet"\ncommand = "{sys.executable}"\nargs = ["{PUPPET}"]\n'
        f"subscribe_topics = {json.dumps(RELAY_TOPICS)}\n")
    return path


async def _publish(redis_url: str, namespace: str) -> dict[str, str]:
    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    try:
        ids = {}
        ids["order"] = (await app.publish("order.created", {"ref": "A-1"})).id
        ids["broken"] = (await app.publish("order.broken", {"ref": "B-7"})).id
        ids["poison1"] = (await app.publish("poison", {"n": 1})).id
        ids["poison2"] = (await app.publish("poison", {"n": 2})).id
        for n in range(3):
            await app.publish("ghost.ping", {"n": n})
        ids["delayed"] = (await app.publish("reminder.due", {"who": "ana"}, delay_s=3600)).id
        ids["chat"] = (await app.publish("chat.msg", {"conv": "c-42", "sleep_s": 60})).id
        return ids
    finally:
        await app.close()


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("dash-cluster")
    namespace = f"tb{uuid.uuid4().hex[:10]}"
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    base["TOKIWA_STATE_DIR"] = str(folder / "state")
    base["PYTHONUNBUFFERED"] = "1"
    out, poison = folder / "out.txt", folder / "poison.flag"
    poison.write_text("broken\n")
    api_port, ro_port = free_port(), free_port()
    common = {"heartbeat_interval_s": 1, "block_ms": 100, "TEST_OUT": out, "TEST_POISON": poison}
    worker = worker_env(base, redis_server.url, namespace, api_port=api_port, api_token=TOKEN,
                        ack_policy="on_success", max_deliveries=1, grace_period_s=1, **common)
    producer = worker_env(base, redis_server.url, namespace, TEST_GHOST=1, **common)
    logs = {name: folder / f"{name}.log" for name in ("worker", "producer", "readonly")}
    client = redis.Redis.from_url(redis_server.url)
    keys = Keys(namespace)
    c = Cluster(redis_server.url, namespace, keys, client, f"http://127.0.0.1:{api_port}/dashboard/",
                f"http://127.0.0.1:{ro_port}/dashboard/", out, poison, logs)
    try:
        c.procs["worker"] = start_worker(worker, logs["worker"], "--relay", str(_relay_toml(folder / "relay.toml")),
                                         app=APP)
        with open(logs["readonly"], "ab") as log:
            c.procs["readonly"] = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli.producer", "dashboard", "--app", APP,
                 "--redis-url", redis_server.url, "--namespace", namespace, "--port", str(ro_port)],
                cwd=ROOT, env=base, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: c.check_alive() or client.hlen(keys.workers) > 0, 20, message="the worker's heartbeat")
        # the producer has ghost-flow, which the worker lacks: it creates that route's group
        with open(logs["producer"], "ab") as log:
            c.procs["producer"] = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli.producer", "run", "--app", APP],
                cwd=ROOT, env=producer, stdout=log, stderr=subprocess.STDOUT)

        def ghost_group() -> bool:
            c.check_alive()
            try:
                groups = client.xinfo_groups(keys.events)
            except redis.ResponseError:
                return False
            return any(g["name"] == b"workers:wf:ghost-flow" for g in groups)

        wait_until(ghost_group, 20, message="the producer's ghost-flow group")
        c.ids = asyncio.run(_publish(redis_server.url, namespace))
        wait_until(serving(c.dashboard + "api/session"), 20, message="the worker's dashboard")
        wait_until(serving(c.readonly + "api/session"), 20, message="the standalone dashboard")

        missing: list[str] = []

        def settled() -> bool:
            c.check_alive()
            checks = {
                "3 dead letters": lambda: len(c.dead_ids()) == 3,
                "order-flow succeeded": lambda: c.run_of("order-flow", "succeeded") is not None,
                "broken-flow failed": lambda: c.run_of("broken-flow", "failed") is not None,
                "chat-flow running": lambda: c.run_of("chat-flow", "running") is not None,
                "lock c-42": lambda: client.exists(keys.conversation_lock("c-42")) == 1,
                "a relay heartbeat": lambda: client.hlen(keys.relays) > 0,
                "the cron leader": lambda: client.exists(keys.leader("cron")) == 1,
            }
            missing[:] = [name for name, check in checks.items() if not check()]
            return not missing

        try:
            wait_until(settled, 30, interval=0.1)
        except AssertionError:
            tails = "\n".join(f"--- {n}\n{p.read_text()[-2000:]}" for n, p in logs.items() if p.exists())
            raise AssertionError(f"the cluster never showed: {missing}\n{tails}") from None
        yield c
    finally:
        for proc in c.procs.values():
            stop(proc, timeout=10)
        client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) or shutil.which(Path(p).name))]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the browser tests drive Debian's chromium headless. "
                    "`make test` installs it (apt-get install chromium chromium-driver)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `make test` installs the test extra (pip install -e '.[test]')",
                    pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else str(shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, tmp_path: Path):
    """The browser, with ``page.shot(name)`` saving a PNG under the test's tmp_path, and the
    page's JavaScript errors failing the test."""
    shots: list[Path] = []

    class Page:
        driver = browser

        def shot(self, name: str) -> Path:
            """A PNG of the whole page (the window grows to its height, up to 3000 px)."""
            path = tmp_path / f"{name}.png"
            height = int(browser.execute_script("return document.documentElement.scrollHeight"))
            browser.set_window_size(WIDTH, max(HEIGHT, min(height + 120, 3000)))
            try:
                browser.save_screenshot(str(path))
            finally:
                browser.set_window_size(WIDTH, HEIGHT)
            shots.append(path)
            return path

    yield Page()
    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"
              and "favicon" not in e.get("message", "") and "Failed to load resource" not in e.get("message", "")]
    assert not severe, f"JavaScript errors on the page: {severe}"
    for path in shots:
        assert path.stat().st_size > 5000, f"{path} looks empty"


def wait_for(driver: Any, predicate: Callable[[Any], Any], timeout: float = 10.0, message: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(predicate, message)


def now() -> float:
    return time.monotonic()
