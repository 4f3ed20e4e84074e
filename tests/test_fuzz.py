"""Random paths, query strings, headers and bodies at every endpoint: never a 5xx or a traceback, always
a JSON error, and a rejected request changes nothing in Redis."""

from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eas_queue import create_app
from settings import load_settings
from tests.conftest import TOKEN

PREFIXES = [
    "/api/predict/",
    "/api/predict/svc",
    "/api/predict/svc/sink",
    "/api/predict/svc/v1/",
    "/rq/",
    "/rq/0/",
    "/rq/0/data/jobs/default/",
    "/rq/job/",
    "/healthz",
    "/",
    "",
]
SEGMENTS = st.sampled_from(
    [
        "svc",
        "sink",
        "..",
        ".",
        "",
        "%2F",
        "%00",
        "%2e%2e",
        "@evil",
        "\\",
        "rq",
        "0",
        "00000000-0000-4000-8000-000000000000",
        "data",
        "x" * 200,
    ]
) | st.text(max_size=12)
PARAMETERS = st.sampled_from(["_priority_", "_ttl_", "request_id", "_x_", "tag", ""]) | st.text(max_size=8)
VALUES = st.sampled_from(["0", "1", "2", "-1", "nan", "", "1e9", "00000000-0000-4000-8000-000000000000"]) | st.text(
    max_size=12
)
LATIN1 = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
# Mostly a good token, so the fuzzing gets past authentication to the validation behind it.
GOOD = [TOKEN, TOKEN, TOKEN, f"Bearer {TOKEN}", "Basic b3BzOnRlc3QtdG9rZW4="]  # the last: ops:test-token
AUTHORIZATION = st.sampled_from([*GOOD, None, "Bearer", ""]) | LATIN1


@pytest.fixture(scope="module")
def client(redis_server, model):
    settings_ = load_settings(
        {
            "EAS_QUEUE_REDIS_URL": redis_server.url,
            "EAS_QUEUE_TOKENS": TOKEN,
            "EAS_QUEUE_TARGET_API_BASE_URL": model.url,
            "EAS_QUEUE_MAX_BODY_BYTES": "4096",
        }
    )
    return create_app(settings_).test_client()


def snapshot(db):
    return db.dbsize(), db.llen("rq:queue:high"), db.llen("rq:queue:default"), db.zcard("eas:open")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"]),
    prefix=st.sampled_from(PREFIXES[:4] * 3 + PREFIXES),
    segments=st.lists(SEGMENTS, max_size=4),
    query=st.lists(st.tuples(PARAMETERS, VALUES), max_size=4),
    authorization=AUTHORIZATION,
    content_type=st.none() | LATIN1,
    idempotency_key=st.none() | LATIN1,
    body=st.binary(max_size=300) | st.binary(min_size=4090, max_size=4200),  # around max_body_bytes
)
def test_no_input_gets_a_5xx_and_rejected_input_changes_nothing(
    client, db, method, prefix, segments, query, authorization, content_type, idempotency_key, body
):
    path = prefix + "/".join(quote(s, safe="/%@\\") if s.isascii() else quote(s) for s in segments)
    if path.startswith("//"):  # the test client would read `//x` as a host; `//` inside paths is kept
        path = "/api/predict/svc" + path
    headers = {}
    for name, value in (
        ("Authorization", authorization),
        ("Content-Type", content_type),
        ("Idempotency-Key", idempotency_key),
    ):
        if value is not None:
            headers[name] = value
    before = snapshot(db)
    response = client.open(path or "/", method=method, query_string=query, headers=headers, data=body)
    event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics shows what was reached
    assert response.status_code < 500, (response.status_code, response.get_data()[:300])
    text = response.get_data()
    assert b"Traceback" not in text
    if response.status_code >= 400:
        if method != "HEAD":
            assert response.is_json and "error" in response.get_json(), text[:300]
        assert snapshot(db) == before
