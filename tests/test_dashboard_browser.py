"""The dashboard in a real browser (Debian's chromium, driven by Playwright), with the operator's Basic
credentials, against the real API, workers and model: what a model answers is shown, never run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import TOKEN

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, as `make test` installs it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # deadline for a page to show what a test waits for

# Run as script, it would mark the page and empty the failed registry with the operator's credentials
# (the request comes from the dashboard's own origin, so the Origin check lets it through).
PAYLOAD = "<img src=x onerror=window.__xss=1;$.post('/rq/queue/default/failed/empty')><svg/onload=window.__xss=2>"

# Before any page script: record CSP violations and script errors for the test to read.
RECORDER = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective));
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Fails, never skips, without chromium: `make test` installs Debian's."""
    assert shutil.which(CHROMIUM), "no chromium: `make test` installs Debian's (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, api) -> Iterator[Page]:
    context = browser.new_context(base_url=api.url, http_credentials={"username": "ops", "password": TOKEN})
    context.add_init_script(RECORDER)
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.script_errors = []  # type: ignore[attr-defined]
    opened.on("pageerror", lambda error: opened.script_errors.append(str(error)))  # type: ignore[attr-defined]
    yield opened
    context.close()


def wait_for_text(page: Page, selector: str, text: str) -> str:
    """Waits until the element's text contains `text` (the page's scripts have rendered the data), or the
    payload became markup (then the test fails on what ran, not on a timeout)."""
    page.wait_for_function(
        """([selector, text]) => (document.querySelector(selector)?.textContent || '').includes(text)
            || window.__xss !== undefined || document.querySelector(`${selector} img, ${selector} svg`)""",
        arg=[selector, text],
        timeout=WAIT_MS,
    )
    assert page.evaluate("window.__xss") is None, "the payload ran as script"
    shown = page.locator(selector).first.text_content() or ""
    assert text in shown
    return shown


def assert_nothing_ran(page: Page, container: str) -> None:
    assert page.locator(f"{container} img, {container} svg, {container} script").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("window.__violations") == []  # the dashboard itself works within its policy
    assert page.script_errors == []  # type: ignore[attr-defined]


def test_model_answers_show_as_text_on_the_job_page_and_the_jobs_list(api, workers, db, page):
    echoed = api.submit_ok(body=PAYLOAD, headers={"Content-Type": "text/html"}, params={"echo": "1"})
    refused = api.submit_ok(params={"status": "400", "answer": PAYLOAD})
    workers.start()
    assert api.wait_status(echoed, "SUCCESS")["result"]["body"] == PAYLOAD
    api.wait_status(refused, "FAILURE")

    page.goto(f"/rq/0/view/job/{echoed}")
    shown = wait_for_text(page, "#job-data", PAYLOAD)  # the result, as the model sent it
    assert "POST /api/predict/svc" in shown
    assert_nothing_ran(page, "#job-data")

    page.goto(f"/rq/0/view/job/{refused}")
    shown = wait_for_text(page, "#job-data pre.exc_info", f"the model answered HTTP 400: {PAYLOAD}")
    assert_nothing_ran(page, "#job-data")

    page.goto("/rq/0/view/jobs/default/failed/8/asc/1")
    row = wait_for_text(page, "#jobs pre.exc_info", f"the model answered HTTP 400: {PAYLOAD}")  # not &lt;
    assert "&lt;" not in row
    assert page.locator("#jobs .description").text_content() == "POST /api/predict/svc"
    assert_nothing_ran(page, "#jobs")

    page.goto("/rq/0/view/queues")
    wait_for_text(page, "#queues", "default")
    assert_nothing_ran(page, "#queues")
    assert db.zcard("rq:failed:default") == 1 and api.state(refused)["status"] == "FAILURE"  # nothing emptied


def test_the_content_security_policy_stops_injected_markup(api, db, page):
    """Second layer: were some job data ever inserted as HTML, its inline handlers would not run."""
    page.goto("/rq/0/view/queues")
    wait_for_text(page, "#queues", "No queues.")  # the dashboard's scripts ran under the policy
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=window.__xss=1>')")
    page.wait_for_function(
        "window.__xss !== undefined || window.__violations.some(d => d.startsWith('script-src'))", timeout=WAIT_MS
    )
    assert page.evaluate("window.__xss") is None


def test_requeue_twice_in_the_browser_answers_409(api, workers, db, page):
    request_id = api.submit_ok(params={"status": "400"})
    workers.start()
    api.wait_status(request_id, "FAILURE")
    workers.stop_all()  # it stays queued after the first click
    page.goto(f"/rq/0/view/job/{request_id}")
    wait_for_text(page, "#job-data", "failed")
    answers = []
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith(f"/rq/job/{request_id}/requeue")) as answer:
            page.click("#requeue-job-btn")
        answers.append(answer.value)
    assert [a.status for a in answers] == [200, 409]
    assert answers[1].json() == {"error": "only a failed job can be requeued; this one is queued", "status": "queued"}
    assert page.script_errors == []  # type: ignore[attr-defined]


def test_the_workers_page_shows_the_request_never_its_body(api, workers, db, page):
    body = b'{"secret": "BODY-MUST-NOT-SHOW"}'
    # The first attempt is refused (503) with the payload, so the last error shown holds it.
    params = {"_priority_": "1", "fail_first": "1", "answer": PAYLOAD, "delay": "6"}
    api.submit_ok(body=body, params=params)
    workers.start(env={"EAS_QUEUE_FORWARD_TIMEOUT": "30"})
    page.goto("/rq/0/view/workers")
    expected = f"svc, priority, {len(body)} bytes, attempt 2, last error: the model answered HTTP 503: {PAYLOAD}"
    shown = wait_for_text(page, "#workers", expected)
    assert "BODY-MUST-NOT-SHOW" not in page.content() and "worker.forward" not in shown
    assert_nothing_ran(page, "#workers")


def test_no_dashboard_page_refers_to_a_missing_file(api, db, page):
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    for path in ("/rq/", "/rq/0/view/jobs", "/rq/0/view/workers"):
        page.goto(path, wait_until="load")
        icon = page.evaluate("fetch(document.querySelector('link[rel~=icon]').href).then(r => r.status)")
        assert icon == 200, path
    assert failed == []
