"""rq-dashboard at /rq, behind HTTP Basic auth whose password is an API token."""

import re

import requests

from tests.conftest import TOKEN, wait_for


def test_dashboard_needs_a_token_as_password(api, db):
    for auth in (None, ("admin", "wrong"), ("admin", "")):
        response = requests.get(api.url + "/rq/", auth=auth, timeout=5)
        assert response.status_code == 401, auth
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert "error" in response.json()
    bearer = requests.get(api.url + "/rq/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert bearer.status_code == 401


def test_dashboard_shows_our_queues_and_jobs(api, workers, db):
    high = api.submit_ok(params={"_priority_": "1"})
    low = api.submit_ok()
    auth = ("anyone", TOKEN)
    page = requests.get(api.url + "/rq/", auth=auth, timeout=5)
    assert page.status_code == 200
    assert "text/html" in page.headers["Content-Type"]
    queues = requests.get(api.url + "/rq/0/data/queues.json", auth=auth, timeout=5).json()["queues"]
    assert {q["name"]: q["count"] for q in queues} == {"high": 1, "default": 1}
    jobs = requests.get(api.url + "/rq/0/data/jobs/default/queued/8/asc/1.json", auth=auth, timeout=5).json()
    assert [job["id"] for job in jobs["jobs"]] == [low]
    assert jobs["jobs"][0]["description"] == "POST /api/predict/svc"
    workers.start()
    api.wait_status(high, "SUCCESS")
    info = requests.get(f"{api.url}/rq/0/data/job/{high}.json", auth=auth, timeout=5).json()
    assert info["status"] == "finished"
    assert info["origin"] == "high"
    listed = requests.get(api.url + "/rq/0/data/workers.json", auth=auth, timeout=5).json()["workers"]
    assert len(listed) == 1 and listed[0]["queues"] == ["high", "default"]


def test_dashboard_errors_are_json_not_tracebacks(api, db):
    auth = ("anyone", TOKEN)
    missing = requests.get(api.url + "/rq/0/data/job/00000000-0000-4000-8000-000000000000.json", auth=auth, timeout=5)
    assert missing.status_code == 404
    assert missing.json() == {"error": "not found"}
    instance = requests.get(api.url + "/rq/7/data/queues.json", auth=auth, timeout=5)
    assert instance.status_code == 404


def test_job_ids_and_list_pages_that_cannot_exist_are_a_json_404(api, db):
    """rq refuses a job id of other characters than letters, digits, `_` and `-` with a ValueError, and
    rq-dashboard's job list divides by its page size and knows only its own registries: each was a 500."""
    request_id = api.submit_ok()
    auth, origin = ("ops", TOKEN), {"Origin": api.url}
    for job_id in ("%3Cscript%3Ealert(1)%3C%2Fscript%3E", "%3Cscript%3E", "a.b", "x%20y", "..", "%00", "%C3%A9"):
        for method, path in (
            ("GET", f"/rq/0/data/job/{job_id}.json"),
            ("GET", f"/rq/0/view/job/{job_id}"),
            ("POST", f"/rq/job/{job_id}/requeue"),
            ("POST", f"/rq/job/{job_id}/delete"),
        ):
            answer = requests.request(method, api.url + path, auth=auth, headers=origin, timeout=5)
            assert answer.status_code == 404, (method, path, answer.status_code, answer.text[:200])
            assert answer.headers["Content-Type"] == "application/json", (method, path)
            assert "error" in answer.json(), (method, path)
    for page in ("default/bogus/8/asc/1", "default/queued/0/asc/1", "default/queued/x/asc/1", "default/queued/8/asc/y"):
        answer = requests.get(f"{api.url}/rq/0/data/jobs/{page}.json", auth=auth, timeout=5)
        assert answer.status_code == 404, (page, answer.status_code, answer.text[:200])
        assert answer.json() == {"error": "not found"}, page
    empty = requests.post(f"{api.url}/rq/queue/default/bogus/empty", auth=auth, headers=origin, timeout=5)
    assert empty.status_code == 404
    assert db.llen("rq:queue:default") == 1  # nothing was changed
    listed = requests.get(f"{api.url}/rq/0/data/jobs/default/queued/8/asc/1.json", auth=auth, timeout=5)
    assert [job["id"] for job in listed.json()["jobs"]] == [request_id]
    assert requests.get(f"{api.url}/rq/0/data/job/{request_id}.json", auth=auth, timeout=5).status_code == 200


def test_dashboard_actions_must_come_from_its_own_pages(api, workers, db):
    """Browsers resend Basic credentials to cross-site forms and images: actions need this host's Origin."""
    request_id = api.submit_ok(params={"status": "400"})
    workers.start()
    api.wait_status(request_id, "FAILURE")
    auth = ("ops", TOKEN)
    requeue = f"{api.url}/rq/job/{request_id}/requeue"
    for headers in ({}, {"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}):
        refused = requests.post(requeue, auth=auth, headers=headers, timeout=5)
        assert refused.status_code == 403, headers
        assert "error" in refused.json()
    image = requests.get(f"{api.url}/rq/requeue/default", auth=auth, timeout=5)  # an <img src=...> elsewhere
    assert image.status_code == 403
    for path in (requeue, f"{api.url}/rq/requeue/default", f"{api.url}/rq/"):  # OPTIONS runs no action
        options = requests.options(path, auth=auth, timeout=5)
        assert options.status_code == 204 and not options.content and "Allow" in options.headers, path
    assert api.state(request_id)["status"] == "FAILURE"  # nothing was requeued
    ok = requests.post(requeue, auth=auth, headers={"Referer": f"{api.url}/rq/0/view/jobs"}, timeout=5)
    assert ok.status_code == 200


def test_requeue_of_a_job_that_is_not_failed_answers_409(api, workers, db):
    """A second Requeue (the job is queued again, or done) is a conflict with a reason, never a 500."""
    request_id = api.submit_ok(params={"status": "400"})
    workers.start()
    api.wait_status(request_id, "FAILURE")
    workers.stop_all()  # so that it stays queued between the two clicks
    auth, origin = ("ops", TOKEN), {"Origin": api.url}
    requeue = f"{api.url}/rq/job/{request_id}/requeue"
    first = requests.post(requeue, auth=auth, headers=origin, timeout=5)
    assert first.status_code == 200 and first.json()["status"] == "OK"
    again = requests.post(requeue, auth=auth, headers=origin, timeout=5)
    assert again.status_code == 409, again.text
    assert again.json() == {"error": "only a failed job can be requeued; this one is queued", "status": "queued"}
    workers.start()
    assert api.wait_status(request_id, "FAILURE")["attempts"] == 2  # requeued once, run again
    missing = requests.post(f"{api.url}/rq/job/{'0' * 8}-0000-4000-8000-{'0' * 12}/requeue", auth=auth, headers=origin)
    assert missing.status_code == 404 and missing.json() == {"error": "not found"}


def test_requeue_all_skips_jobs_that_are_gone(api, workers, db):
    """Requeue All over a failed registry whose job expired meanwhile requeues the others, no 500."""
    gone, kept = api.submit_ok(params={"status": "400"}), api.submit_ok(params={"status": "400"})
    workers.start()
    api.wait_status(gone, "FAILURE")
    api.wait_status(kept, "FAILURE")
    db.delete(f"rq:job:{gone}")  # as when its hash expires before the registry's entry is cleaned
    answer = requests.post(f"{api.url}/rq/requeue/default", auth=("ops", TOKEN), headers={"Origin": api.url})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "OK", "count": 1}
    assert api.wait_status(kept, "FAILURE")["attempts"] == 2  # it ran again


def test_compact_drops_ids_whose_job_is_gone_and_an_empty_queue_has_nothing_to_compact(api, db):
    """RQ's compact renames the queue's list first, which Redis refuses for a list that is not there: an
    empty queue was a 503 saying Redis was unavailable."""
    auth, origin = ("ops", TOKEN), {"Origin": api.url}
    compact = f"{api.url}/rq/queue/default/compact"
    empty = requests.post(compact, auth=auth, headers=origin, timeout=5)
    assert empty.status_code == 200 and empty.json() == {"status": "OK"}, empty.text
    kept, gone = api.submit_ok(), api.submit_ok()
    db.delete(f"rq:job:{gone}")
    full = requests.post(compact, auth=auth, headers=origin, timeout=5)
    assert full.status_code == 200 and full.json() == {"status": "OK"}, full.text
    assert db.lrange("rq:queue:default", 0, -1) == [kept.encode()]


def test_workers_list_shows_the_request_not_its_body(api, workers, db):
    """The workers list said `worker.forward('svc', ..., b'<the whole body>')`; now what, not the body."""
    body = b'{"secret": "BODY-MUST-NOT-SHOW-' + b"x" * 100 + b'"}'
    params = {"_priority_": "1", "fail_first": "1", "delay": "3"}
    request_id = api.submit_ok(body=body, params=params)
    workers.start(env={"EAS_QUEUE_FORWARD_TIMEOUT": "30"})
    url = api.url + "/rq/0/data/workers.json"

    def busy_on_second_attempt() -> dict | None:
        listed = requests.get(url, auth=("ops", TOKEN), timeout=5)
        assert b"BODY-MUST-NOT-SHOW" not in listed.content
        current = listed.json()["workers"][0]["current_job"] if listed.json()["workers"] else "idle"
        return current if current != "idle" and current["attempt"] == 2 else None

    current = wait_for(busy_on_second_attempt, 30, "the worker to forward the second attempt")
    assert current["job_id"] == request_id
    assert current["service"] == "svc" and current["priority"] is True
    assert current["body_bytes"] == len(body)
    assert current["last_error"].startswith("the model answered HTTP 503")
    assert current["call_string"].startswith(f"svc, priority, {len(body):,} bytes, attempt 2, last error: ")
    assert current["description"] == "POST /api/predict/svc"


def test_dashboard_pages_carry_a_content_security_policy(api, db):
    """Only the dashboard's own files and its nonce'd inline script may run, whatever a page shows."""
    auth = ("ops", TOKEN)
    pages = [requests.get(api.url + "/rq/0/view/jobs", auth=auth, timeout=5) for _ in range(2)]
    nonces = []
    for page in pages:
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        assert f'<script type="text/javascript" nonce="{nonce}">' in page.text
        assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
        nonces.append(nonce)
    assert nonces[0] != nonces[1]
    data = requests.get(api.url + "/rq/0/data/queues.json", auth=auth, timeout=5)
    assert "Content-Security-Policy" in data.headers and data.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in requests.get(api.url + "/healthz", timeout=5).headers


def test_the_favicon_link_resolves(api, db):
    auth = ("ops", TOKEN)
    page = requests.get(api.url + "/rq/", auth=auth, timeout=5).text
    href = re.search(r'<link rel="shortcut icon" href="([^"]+)"', page).group(1)
    icon = requests.get(api.url + href, auth=auth, timeout=5)
    assert icon.status_code == 200, href
    assert icon.headers["Content-Type"].startswith("image/")
