"""The dashboard in a real headless browser (Debian's chromium, driven by
Playwright's Python API), over a real pool, a real Redis and
`python supervisor.py dashboard` in its own process.

- The page shows the pool's true numbers (the same as `status --json`), its
  supervisor and workers, charts, and records with thumbnails of their JPEGs.
- Image and request ids like `<script>` and `<img onerror>` show as text: no
  script of theirs runs.
- A dead letter is requeued only with the token: without it, with the token
  from another origin (fetch with the header: the preflight is refused; a
  simple form-like POST: Origin is refused), nothing moves; with it, from the
  page, the message goes back and the pool completes it.

Skipped, saying why, where chromium or Playwright is missing (`.ci/run`
installs chromium when it runs as root; requirements-dev.txt has Playwright).
Playwright's own browser download (`playwright install`) is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import redis

from harness import REPO_ROOT
from harness.http_server import HttpServer
from harness.pool import POOL_ENV_VARS, Pool
from image_result_client.protocol import QueueKeys
from tests.helpers import push, wait_for_records, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "chromium is not installed (apt-get install -y chromium; .ci/run does it as root)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -r requirements-dev.txt)"
)

pytestmark = pytest.mark.timeout(120)

TOKEN = "dashboard-test-token-0123456789"
HOSTILE_REQUEST = "<script>window.pwned = 'request'</script>"
HOSTILE_IMAGE = "<img src=x onerror=\"window.pwned='image'\">"
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        # Root (CI containers) needs --no-sandbox; nothing else differs from a desktop chromium.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


# Conditions to wait for are written as functions: a bare expression would be
# evaluated with eval(), which the page's Content-Security-Policy forbids.
@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context()
    errors: list[str] = []
    opened = context.new_page()
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.set_default_timeout(WAIT_MS)
    try:
        yield opened
        assert errors == [], f"the page's script failed: {errors}"
    finally:
        context.close()


class Dashboard:
    """`python supervisor.py dashboard --port 0` beside a pool; always killed."""

    def __init__(self, pool: Pool, workdir: Path, *, token: str | None) -> None:
        env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
        env.pop("DASHBOARD_TOKEN", None)
        env.update(
            REDIS_URL=pool.redis_url, HOSTING_TASKS_QUEUE=pool.queue, OUTPUT_DIR=str(pool.output_dir),
            LOG_FORMAT="json", PYTHONUNBUFFERED="1",
        )
        if token is not None:
            env["DASHBOARD_TOKEN"] = token
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "dashboard.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "supervisor.py"), "dashboard", "--port", "0"],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )
        self.url = wait_until(self._listening_url, 20, "the dashboard did not say where it listens")

    def _listening_url(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {self.proc.returncode}: {self.stderr_path.read_text()}")
        listening = self.events("dashboard_listening")
        return listening[0]["url"].rstrip("/") if listening else None

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("the dashboard did not stop on SIGTERM") from None


@pytest.fixture
def dashboards(tmp_path: Path) -> Iterator:
    started: list[Dashboard] = []

    def start(pool: Pool, *, token: str | None) -> Dashboard:
        dashboard = Dashboard(pool, tmp_path / f"dashboard{len(started)}", token=token)
        started.append(dashboard)
        return dashboard

    try:
        yield start
    finally:
        for dashboard in started:
            if dashboard.proc.poll() is None:
                os.killpg(dashboard.proc.pid, signal.SIGKILL)
                dashboard.proc.wait()


def status_json(pool: Pool) -> dict:
    env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    env.update(REDIS_URL=pool.redis_url, HOSTING_TASKS_QUEUE=pool.queue, OUTPUT_DIR=str(pool.output_dir))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "supervisor.py"), "status", "--json"],
        cwd=pool.workdir, env=env, capture_output=True, text=True, timeout=30, check=True,
    )
    return json.loads(result.stdout)


def figure(page, name: str) -> str:
    return page.locator(f"#fig-{name}").inner_text().replace(",", "")


def wait_for_text(page, selector: str, expected: str) -> None:
    page.wait_for_function(
        "([selector, expected]) => { const node = document.querySelector(selector);"
        " return node !== null && node.textContent.includes(expected); }",
        arg=[selector, expected],
    )


def test_the_page_shows_the_pools_numbers_workers_and_records_safely(
    pool_factory, redis_client: redis.Redis, queue_name: str, segments, photos, page, dashboards
) -> None:
    pool = pool_factory(workers=2)
    pool.wait_ready()
    push(redis_client, queue_name, segments.message(HOSTILE_REQUEST, HOSTILE_IMAGE, photos["astronaut"]))
    for index, name in enumerate(("chelsea", "coffee", "camera")):
        push(redis_client, queue_name, segments.message(f"req-{index}", f"photo-{name}", photos[name]))
    push(redis_client, queue_name, {"request_id": "bad-1", "image_id": "bad", "shm_info": "not a segment name!"})
    wait_for_records(pool.output_dir, 5, pool=pool)
    dashboard = dashboards(pool, token=None)

    page.goto(dashboard.url + "/")

    wait_for_text(page, "#fig-completed", "4")
    # The lease holds the supervisor's state as of its last renewal (every LEASE_TTL/3).
    wait_for_text(page, ".supervisor h3", "2/2 workers · ready")
    truth = status_json(pool)
    assert figure(page, "completed") == str(truth["last_minute"]["completed"]) == "4"
    assert figure(page, "failed") == str(truth["last_minute"]["failed"]) == "1"
    assert figure(page, "dead") == str(truth["dead_letters"]) == "1"
    assert figure(page, "waiting") == str(truth["queue_depth"]) == "0"
    assert figure(page, "in-flight") == str(truth["in_flight"]) == "0"
    assert figure(page, "delayed") == str(truth["delayed_retries"]) == "0"
    # The supervisor, its ledger and both workers, idle now.
    [supervisor] = truth["supervisors"]
    box = page.locator(".supervisor")
    assert box.count() == 1 and box.get_attribute("data-instance") == supervisor["instance"]
    heading = box.locator("h3").inner_text()
    assert supervisor["host"] in heading and "2/2 workers" in heading and "ready" in heading
    # The frames waiting in its /dev/shm against SHM_BUDGET_BYTES (other tests' frames may come and go).
    budget_mb = f"({supervisor['shm']['budget_bytes'] / 1e6:.1f} MB)"
    assert "MB of frames waiting" in box.locator(".shm").inner_text() and budget_mb in box.locator(".shm").inner_text()
    rows = box.locator("tbody tr")
    assert rows.count() == 3 and rows.nth(0).inner_text().startswith("ledger")
    pids = {str(worker["pid"]) for worker in supervisor["workers"]}
    assert {rows.nth(i).locator("td").nth(1).inner_text() for i in (1, 2)} == pids
    # Charts drawn from the history the dashboard keeps.
    page.wait_for_function("() => document.querySelectorAll('#chart-throughput rect').length >= 1")
    assert page.locator("#chart-queue polyline").count() == 4
    # Records, newest first, with thumbnails of the JPEGs in OUTPUT_DIR.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#records img')].filter(i => i.complete && i.naturalWidth > 0).length === 4"
    )
    sources = page.eval_on_selector_all("#records img", "nodes => nodes.map(n => n.getAttribute('src'))")
    assert all(src.startswith("/thumb?name=") for src in sources)
    failed = page.locator('.record[data-status="failed"]')
    assert failed.count() == 1 and "not a valid segment name" in failed.inner_text()
    # Hostile ids are text: shown as typed, nothing of theirs ran or was added to the page.
    image_ids = page.eval_on_selector_all("#records .image-id", "nodes => nodes.map(n => n.textContent)")
    assert f"image {HOSTILE_IMAGE}" in image_ids
    request_ids = page.eval_on_selector_all("#records .request-id", "nodes => nodes.map(n => n.textContent)")
    assert f"request {HOSTILE_REQUEST}" in request_ids
    assert page.evaluate("window.pwned") is None
    assert page.locator("script").count() == 1 and page.locator("img[onerror]").count() == 0
    # Read-only without DASHBOARD_TOKEN: the buttons say so and do nothing.
    for button in ("#requeue-all", "#purge", "button.requeue"):
        assert page.locator(button).first.is_disabled()
        assert "read-only" in page.locator(button).first.get_attribute("title")
    assert "Read-only" in page.locator("#dead-note").inner_text()
    assert page.locator("#token-form").is_hidden()
    # The search finds a task where the CLI does.
    page.fill("#search-id", "bad-1")
    page.click("#search-form button")
    page.wait_for_selector('#search-result .place[data-state="dead"]')
    assert page.locator('#search-result .place[data-state="recorded"]').count() == 1
    assert dashboard.stop() == 0


def test_a_dead_letter_is_requeued_only_with_the_token_from_the_page(
    pool_factory, redis_client: redis.Redis, queue_name: str, http_server: HttpServer, photos, page, browser,
    dashboards,
) -> None:
    keys = QueueKeys(queue_name)
    pool = pool_factory(workers=1)
    pool.wait_ready()
    image_url = http_server.url("/later.jpg")  # 404 for now: a permanent failure, a dead letter
    push(redis_client, queue_name, {"request_id": HOSTILE_REQUEST, "image_id": HOSTILE_IMAGE, "image_url": image_url})
    wait_until(lambda: redis_client.llen(keys.dead) == 1, 30, "no dead letter")
    dashboard = dashboards(pool, token=TOKEN)

    page.goto(dashboard.url + "/")
    row = page.locator("#dead-rows tr")
    row.first.wait_for()
    assert row.count() == 1
    assert row.locator(".request-id").inner_text() == HOSTILE_REQUEST
    assert row.locator(".image-id").inner_text() == HOSTILE_IMAGE
    assert "HTTP 404" in row.locator(".error").inner_text()
    assert page.evaluate("window.pwned") is None
    letter_id = row.get_attribute("data-id")

    # 1. From the page, without the token.
    row.locator("button.requeue").click()
    wait_for_text(page, "#action-message", "enter the token")
    assert redis_client.llen(keys.dead) == 1 and redis_client.llen(keys.queue) == 0

    # 2. With the token, from another origin: fetch with the header dies at the
    # CORS preflight; a simple POST (no preflight) reaches us and is refused by Origin.
    attacker = browser.new_page()
    try:
        http_server.add("/attack.html", b"<!doctype html><title>elsewhere</title>", content_type="text/html")
        attacker.goto(http_server.url("/attack.html"))
        outcome = attacker.evaluate(
            """async ([url, token, id]) => {
                 const results = [];
                 try {
                   const r = await fetch(url, {method: "POST", body: JSON.stringify({id}),
                     headers: {"Content-Type": "application/json", "X-Dashboard-Token": token}});
                   results.push("fetch " + r.status);
                 } catch (e) { results.push("fetch blocked"); }
                 // Sent without a preflight; the answer is hidden from this page anyway
                 // (and our Cross-Origin-Resource-Policy makes the fetch itself fail).
                 try {
                   await fetch(url, {method: "POST", mode: "no-cors", body: JSON.stringify({id}),
                     headers: {"Content-Type": "text/plain"}});
                 } catch (e) { /* blocked on its way back */ }
                 results.push("simple sent");
                 return results;
               }""",
            [dashboard.url + "/api/dead/requeue", TOKEN, letter_id],
        )
    finally:
        attacker.close()
    assert outcome == ["fetch blocked", "simple sent"]
    # The simple POST reached the dashboard, which refused it for its Origin.
    refusals = wait_until(
        lambda: [e for e in dashboard.events("dashboard_change_refused") if "another site" in e["reason"]],
        10, "the simple cross-origin POST was not refused",
    )
    assert [e["action"] for e in refusals] == ["/api/dead/requeue"]
    refused = page.request.post(
        dashboard.url + "/api/dead/requeue",
        data=json.dumps({"id": letter_id}),
        headers={"Content-Type": "application/json", "X-Dashboard-Token": TOKEN, "Origin": "http://evil.example"},
    )
    assert refused.status == 403 and "another site" in refused.json()["error"]
    assert redis_client.llen(keys.dead) == 1 and redis_client.llen(keys.queue) == 0

    # 3. A wrong token is refused; the right one unlocks, and the requeue moves
    # the message back, which the pool now completes.
    page.fill("#token", "not-the-token-at-all")
    page.click("#unlock")
    wait_for_text(page, "#token-state", "wrong token")
    page.fill("#token", TOKEN)
    page.click("#unlock")
    wait_for_text(page, "#token-state", "changes enabled")
    ok, jpeg = cv2.imencode(".jpg", photos["coffee"])
    assert ok
    http_server.add("/later.jpg", jpeg.tobytes())
    row.locator("button.requeue").click()
    wait_for_text(page, "#action-message", "requeued 1 dead letter")
    records = wait_for_records(pool.output_dir, 2, pool=pool)
    assert [(r["request_id"], r["status"]) for r in records] == [(HOSTILE_REQUEST, "failed"), (HOSTILE_REQUEST, "completed")]
    assert redis_client.llen(keys.dead) == 0
    page.wait_for_function("() => document.querySelectorAll('#dead-rows tr').length === 0")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#records img')].some(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.evaluate("window.pwned") is None
    assert Path(records[1]["file_path"]).is_file()


def test_thumbnails_over_the_rate_limit_wait_as_placeholders_and_a_disabled_purge_is_not_red(
    pool_factory, redis_client: redis.Redis, queue_name: str, segments, photos, page, dashboards
) -> None:
    """Eight records at once: the dashboard makes a few thumbnails a second and
    answers 503 beyond that. The page shows a placeholder for each thumbnail not
    made yet and asks again; never a broken image. Read-only, the disabled
    "Purge all" is grey, not the red of a button that deletes."""
    pool = pool_factory(workers=2)
    pool.wait_ready()
    names = ("astronaut", "chelsea", "coffee", "camera")
    for index in range(8):
        push(redis_client, queue_name, segments.message(f"req-{index}", f"photo-{index}", photos[names[index % 4]]))
    wait_for_records(pool.output_dir, 8, pool=pool)
    dashboard = dashboards(pool, token=None)

    page.goto(dashboard.url + "/")
    page.evaluate(
        """() => {
        window.seen = { broken: 0, placeholders: 0 };
        setInterval(() => {
          const images = [...document.querySelectorAll('#records img')];
          window.seen.broken += images.filter(i => i.complete && i.naturalWidth === 0).length;
          window.seen.placeholders = Math.max(window.seen.placeholders,
            document.querySelectorAll('#records .thumb-pending').length);
        }, 20);
      }"""
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('#records img')].filter(i => i.complete && i.naturalWidth > 0).length === 8",
        timeout=60_000,
    )

    seen = page.evaluate("() => window.seen")
    assert seen["broken"] == 0, seen
    assert seen["placeholders"] >= 1, seen  # the limit was met: some waited
    assert page.locator("#records .thumb-pending").count() == 0
    purge = page.locator("#purge")
    assert purge.is_disabled()
    background = purge.evaluate("node => getComputedStyle(node).backgroundColor")
    red = page.evaluate("() => getComputedStyle(document.documentElement).getPropertyValue('--bad').trim()")
    assert red == "#c53030" and background != "rgb(197, 48, 48)", background
    assert pool.stop() == 0


def test_open_requests_are_listed_with_their_progress_and_found_by_id(
    pool_factory, redis_client: redis.Redis, queue_name: str, segments, photos, page, dashboards
) -> None:
    """Two of a hostile-named request's three images recorded: the page lists it
    as "2 of 3" (as text), the search says so too; when its last image is
    recorded, it leaves the list."""
    pool = pool_factory(workers=1)
    pool.wait_ready()
    for index in range(2):
        message = segments.message(HOSTILE_REQUEST, f"page-{index}", photos["chelsea"])
        push(redis_client, queue_name, {**message, "request_images": 3})
    wait_for_records(pool.output_dir, 2, pool=pool)
    dashboard = dashboards(pool, token=None)

    page.goto(dashboard.url + "/")
    wait_for_text(page, "#requests-count", "1 open")
    row = page.locator("#requests-rows tr")
    assert row.locator(".request-id").inner_text() == HOSTILE_REQUEST
    assert row.locator(".progress").inner_text() == "2 of 3"
    page.fill("#search-id", HOSTILE_REQUEST)
    page.press("#search-id", "Enter")
    wait_for_text(page, "#search-result", "2 of 3 recorded")

    push(redis_client, queue_name, {**segments.message(HOSTILE_REQUEST, "page-2", photos["chelsea"]), "request_images": 3})
    wait_for_text(page, "#requests-count", "none")
    assert page.locator("#requests-rows tr").count() == 0
    assert page.evaluate("() => window.pwned === undefined")
    assert dashboard.stop() == 0
    assert pool.stop() == 0
