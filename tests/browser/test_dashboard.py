"""The dashboard in a real headless Chromium against a live cluster (tests/browser/conftest.py):
every page loads and shows what Redis holds, a run's DAG is drawn with its nodes and edges, a
failed run shows its error, dead letters are requeued and purged with the bearer token, and
without the token the buttons are refused. Each test saves screenshots under its tmp_path.

The tests run in file order on one cluster: the read-only checks come before the requeue and
purge that empty the dead letters."""

from __future__ import annotations

import pytest

from tests.browser.conftest import TOKEN, http, wait_for
from tests.integration.procs import wait_until

pytestmark = pytest.mark.timeout(90)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector):
    found = css(driver, selector)
    return found[0] if found else None


# The page redraws what changed every 1.5 s: read it in one script call (no element handle
# can go stale between finding and reading), and retry a click whose element was redrawn.
def text_of(driver, selector) -> str:
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? (e.innerText ?? e.textContent) : '';", selector))


def attrs(driver, selector, name) -> list:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.getAttribute(arguments[1]));",
        selector, name))


def lefts(driver, selector, name) -> dict:
    """``name`` attribute → the element's left edge on the page."""
    return dict(driver.execute_script(
        "const o = {}; document.querySelectorAll(arguments[0]).forEach("
        "e => { o[e.getAttribute(arguments[1])] = e.getBoundingClientRect().left; }); return o;", selector, name))


def enabled(driver, selector) -> list:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => !e.disabled);", selector))


def click(driver, selector) -> None:
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(10):
        wait_for(driver, lambda d: one(d, selector) is not None, 5, f"{selector} to click")
        try:
            one(driver, selector).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being redrawn")


def shown(driver, selector) -> bool:
    return bool(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return !!e && (e.open === undefined || e.open) "
        "&& e.getClientRects().length > 0;", selector))


def open_page(driver, base: str, route: str, ready: str) -> None:
    """Load ``base#route`` and wait until ``ready`` (a CSS selector) is on the page."""
    from selenium.common.exceptions import TimeoutException

    driver.get(base + "#" + route)
    try:
        wait_for(driver, lambda d: one(d, ready) is not None)
    except TimeoutException:
        raise AssertionError(f"no {ready} on {route}; the page shows:\n{text_of(driver, 'body')}\n"
                             f"console: {driver.get_log('browser')}") from None


def test_the_runs_page_lists_runs_and_filters_them_by_status_and_workflow(cluster, page):
    d = page.driver
    open_page(d, cluster.dashboard, "/runs", "#runs-table")
    wait_for(d, lambda d: len(css(d, "#runs-table tbody tr")) >= 3)
    statuses = set(attrs(d, "#runs-table tbody tr", "data-status"))
    assert {"succeeded", "failed", "running"} <= statuses
    body = text_of(d, "#runs-table")
    assert "order-flow" in body and "broken-flow" in body and "chat-flow" in body
    assert "ValueError: card declined for order B-7" in body
    assert text_of(d, "[data-count=running]") == "1"
    page.shot("runs")

    from selenium.webdriver.support.ui import Select

    Select(one(d, "#status-filter")).select_by_value("failed")
    wait_for(d, lambda d: "status=failed" in d.current_url
             and set(attrs(d, "#runs-table tbody tr", "data-status")) == {"failed"})
    assert "broken-flow" in text_of(d, "#runs-table") and "order-flow" not in text_of(d, "#runs-table")
    page.shot("runs-failed")

    Select(one(d, "#status-filter")).select_by_value("")
    wait_for(d, lambda d: "order-flow" in attrs(d, "#workflow-filter option", "value"))
    Select(one(d, "#workflow-filter")).select_by_value("order-flow")
    wait_for(d, lambda d: "workflow=order-flow" in d.current_url and css(d, "#runs-table tbody tr")
             and "broken-flow" not in text_of(d, "#runs-table") and "order-flow" in text_of(d, "#runs-table"))


def test_a_run_page_draws_the_dag_by_dependency_depth_with_attempts_durations_and_logs(cluster, page):
    d = page.driver
    run = cluster.run_of("order-flow", "succeeded")
    open_page(d, cluster.dashboard, "/runs", f"tr[data-run-id='{run['run_id']}'] a")
    click(d, f"tr[data-run-id='{run['run_id']}'] a")
    wait_for(d, lambda d: len(css(d, "svg#dag g.node")) == 4, message="the four nodes of order-flow")
    assert set(attrs(d, "svg#dag g.node", "data-node")) == {"fetch", "parse", "enrich", "report"}
    assert set(attrs(d, "svg#dag g.node", "data-status")) == {"succeeded"}
    assert attrs(d, "svg#dag", "data-edges-from") == ["workflow"]
    edges = set(zip(attrs(d, "svg#dag path.edge", "data-from"), attrs(d, "svg#dag path.edge", "data-to"),
                    strict=True))
    assert edges == {("fetch", "parse"), ("fetch", "enrich"), ("parse", "report"), ("enrich", "report")}
    x = lefts(d, "svg#dag g.node", "data-node")
    assert x["fetch"] < x["parse"] == x["enrich"] < x["report"]  # columns = dependency depth
    assert "1 attempt" in text_of(d, "g.node[data-node=report]")
    assert " ms" in text_of(d, "g.node[data-node=enrich]")
    logs = text_of(d, "#logs")
    assert "fetching order A-1" in logs and "report ready" in logs
    assert "succeeded" in text_of(d, "#run-meta")
    click(d, "g.node[data-node=enrich]")
    wait_for(d, lambda d: "enrich" in text_of(d, "#node-detail") and "gold" in text_of(d, "#node-detail"))
    page.shot("run-dag")


def test_a_failed_run_shows_the_failed_node_and_its_error(cluster, page):
    d = page.driver
    run = cluster.run_of("broken-flow", "failed")
    open_page(d, cluster.dashboard, "/runs/" + run["run_id"], ".node-error[data-node=charge]")
    statuses = dict(zip(attrs(d, "svg#dag g.node", "data-node"), attrs(d, "svg#dag g.node", "data-status"),
                        strict=True))
    assert statuses["prepare"] == "succeeded" and statuses["charge"] == "failed"
    assert statuses["notify"] in ("skipped", "pending", "cancelled")
    error = text_of(d, ".node-error[data-node=charge]")
    assert "ValueError: card declined for order B-7" in error and "caused by KeyError" in error
    assert "ValueError" in text_of(d, "#run-error")
    record = http(cluster.dashboard + "api/runs/" + run["run_id"])[1]
    if record["nodes"]["charge"].get("traceback"):  # recorded by versions that keep tracebacks
        assert "Traceback (most recent call last)" in error and 'in charge' in error
    assert "the card processor answered 402" in text_of(d, "#logs")
    page.shot("run-failed")


def test_the_workers_page_lists_the_live_worker_with_its_heartbeat_and_groups(cluster, page):
    d = page.driver
    open_page(d, cluster.dashboard, "/workers", "#workers-table tbody tr")
    worker_id = cluster.client.hkeys(cluster.keys.workers)[0].decode()
    row = text_of(d, f"tr[data-worker-id='{worker_id}']")
    assert "live" in row and str(cluster.procs["worker"].pid) in row
    groups = text_of(d, f"tr[data-worker-id='{worker_id}'] td.groups")
    assert "workers:wf:order-flow" in groups and "workers:sub:dash.poison" in groups
    assert "ghost-flow" not in groups
    first = attrs(d, "#view", "data-loaded")
    wait_for(d, lambda d: attrs(d, "#view", "data-loaded") != first, 5, "a second poll")
    page.shot("workers")


def test_the_streams_page_shows_lag_pending_and_a_group_waiting_with_no_live_worker(cluster, page):
    d = page.driver
    open_page(d, cluster.dashboard, "/streams", "#groups-table tr[data-group='workers:wf:ghost-flow']")
    ghost = "#groups-table tr[data-group='workers:wf:ghost-flow']"
    # the group reads every entry published since it was made (3 of them ghost.ping) and no
    # worker reads it: its lag is every one of them
    lag = next(int(g["lag"]) for g in cluster.client.xinfo_groups(cluster.keys.events)
               if g["name"] == b"workers:wf:ghost-flow")
    assert lag >= 3 and text_of(d, ghost + " td.lag") == str(lag)
    assert "waiting: no live worker" in text_of(d, ghost)
    assert "waiting" in attrs(d, ghost, "class")[0]
    assert "workers:wf:ghost-flow" in text_of(d, "#waiting-banner")
    chat = "#groups-table tr[data-group='workers:wf:chat-flow']"
    assert text_of(d, chat + " td.pending") == "1"  # the running turn
    assert "read" in text_of(d, chat)
    length = cluster.client.xlen(cluster.keys.events)
    assert text_of(d, f"[data-stream='{cluster.keys.events}'] dd.length") == str(length)
    assert text_of(d, "[data-count=waiting_groups]") == "1"
    page.shot("streams")


def test_cron_locks_relays_and_delayed_pages(cluster, page):
    d = page.driver
    open_page(d, cluster.dashboard, "/cron", "#cron-table tr[data-job=nightly-report]")
    job = text_of(d, "#cron-table tr[data-job=nightly-report]")
    assert "0 3 * * *" in job and "event" in job and "03:00:00Z" in job
    holder = cluster.client.get(cluster.keys.leader("cron")).decode()
    assert holder in text_of(d, "#cron-leader")
    page.shot("cron")

    open_page(d, cluster.dashboard, "/locks", "#locks-table tr[data-conversation=c-42]")
    assert cluster.client.get(cluster.keys.conversation_lock("c-42")).decode() in text_of(d, "#locks-table")
    page.shot("locks")

    open_page(d, cluster.dashboard, "/relays", "#relays-table tbody tr")
    topics = text_of(d, "#relays-table td.topics")
    assert "orders.paid" in topics and "greetings" in topics
    assert "puppet" in text_of(d, "#relays-table") and "live" in text_of(d, "#relays-table")
    page.shot("relays")

    open_page(d, cluster.dashboard, "/delayed", f"#delayed-table tr[data-event-id='{cluster.ids['delayed']}']")
    row = text_of(d, f"#delayed-table tr[data-event-id='{cluster.ids['delayed']}']")
    assert "reminder.due" in row and "in " in row
    page.shot("delayed")


def test_without_a_token_the_dashboard_is_read_only(cluster, page):
    d = page.driver
    before = cluster.dead_ids()
    assert len(before) == 3
    # the standalone dashboard has no token: its buttons are off, its POSTs are refused
    open_page(d, cluster.readonly, "/dead", "#dead-table tbody tr")
    assert "Read-only" in text_of(d, "#readonly-banner")
    assert enabled(d, "#dead-table button.requeue") == [False, False, False]
    assert enabled(d, "#purge") == [False] and enabled(d, "#requeue-all") == [False]
    assert "read-only" in text_of(d, "#mode")
    answer = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('api/dead/purge', {method: 'POST', headers: {Authorization: 'Bearer guess'}})"
        ".then(r => done(r.status));")
    assert answer == 403
    page.shot("dead-readonly")

    # the worker's dashboard has a token: the page asks for it; a wrong one is refused
    open_page(d, cluster.dashboard, "/dead", "#dead-table tbody tr")
    d.execute_script("sessionStorage.clear()")
    assert "until you give the token" in text_of(d, "#mode")
    click(d, f"tr[data-dead-id='{before[0]}'] button.requeue")
    wait_for(d, lambda d: shown(d, "#token-dialog"), 5, "the token dialog")
    page.shot("dead-token-dialog")
    click(d, "#token-cancel")
    wait_for(d, lambda d: "no token given" in text_of(d, "#flash"), 5)
    click(d, f"tr[data-dead-id='{before[0]}'] button.requeue")
    wait_for(d, lambda d: shown(d, "#token-dialog"), 5)
    one(d, "#token-input").send_keys("wrong-token")
    click(d, "#token-save")
    wait_for(d, lambda d: "refused (401)" in text_of(d, "#flash"), 5, "the 401 refusal")
    assert d.execute_script("return sessionStorage.getItem('tokiwa.dashboard.token')") is None
    assert len(css(d, "#dead-table tbody tr[data-dead-id]")) == 3
    assert cluster.dead_ids() == before
    for url in (cluster.dashboard, cluster.readonly):  # plain HTTP, no token
        assert http(url + "api/dead/requeue", method="POST", body={"all": True})[0] in (401, 403)
    assert http(cluster.dashboard + "api/dead/purge", method="POST", token="nope")[0] == 401
    assert cluster.dead_ids() == before
    page.shot("dead-refused")


def test_requeue_with_the_token_moves_the_dead_letter_back_and_purge_empties_the_list(cluster, page):
    d = page.driver
    assert len(cluster.dead_ids()) == 3
    poisoned = cluster.dead_ids("workers:sub:dash.poison")
    assert len(poisoned) == 2
    cluster.poison.unlink()  # fix the handler first, then requeue
    open_page(d, cluster.dashboard, "/dead", "#dead-table tbody tr")
    d.execute_script("sessionStorage.clear()")
    target = poisoned[0]
    event_id = text_of(d, f"tr[data-dead-id='{target}'] td:nth-child(3)")
    assert event_id in (cluster.ids["poison1"], cluster.ids["poison2"])
    assert "poison pill" in text_of(d, f"tr[data-dead-id='{target}']")
    page.shot("dead-letters")
    click(d, f"tr[data-dead-id='{target}'] button.requeue")
    wait_for(d, lambda d: shown(d, "#token-dialog"), 5)
    one(d, "#token-input").send_keys(TOKEN)
    click(d, "#token-save")
    wait_for(d, lambda d: one(d, f"tr[data-dead-id='{target}']") is None, 5, "the requeued row to leave")
    assert "requeued " + target in text_of(d, "#flash")
    assert "token accepted" in text_of(d, "#mode")
    assert target not in cluster.dead_ids()
    # back on the events stream with its event id, and run again by the now fixed handler
    wait_until(lambda: cluster.out.exists() and f"poison {event_id} ok" in cluster.out.read_text(), 10,
               message="the requeued event to be handled")
    page.shot("dead-requeued")

    click(d, "#purge")
    wait_for(d, lambda d: one(d, "#purge-yes") is not None, 5)
    assert "Delete all 2 dead letter(s)?" in text_of(d, ".confirm")
    click(d, "#purge-yes")  # the token is in sessionStorage now: no dialog
    wait_for(d, lambda d: one(d, "#dead-table-empty") is not None, 5, "an empty list")
    assert "purged 2 dead letter(s)" in text_of(d, "#flash")
    assert cluster.client.xlen(cluster.keys.dead) == 0
    page.shot("dead-purged")
