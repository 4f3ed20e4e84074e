"""rq-dashboard at /rq, behind HTTP Basic auth whose password is an API token."""

import requests

from tests.conftest import TOKEN


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
    assert api.state(request_id)["status"] == "FAILURE"  # nothing was requeued
    ok = requests.post(requeue, auth=auth, headers={"Referer": f"{api.url}/rq/0/view/jobs"}, timeout=5)
    assert ok.status_code == 200
