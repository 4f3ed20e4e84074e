"""Settings: defaults from settings.toml, a TOML file laid over them, the environment over both; a bad
setting stops the API and the workers at start with one line naming the key."""

import subprocess

import pytest

from redis_connection import SENTINEL_FORM, SentinelTarget, parse_sentinel_url, rq_cli_settings
from settings import SettingsError, load_settings
from tests.conftest import BIN, ROOT, service_env


def test_defaults_come_from_settings_toml():
    settings = load_settings({})
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.retry_intervals == (1, 5, 30)
    assert settings.tokens == ("demo-token",)
    assert settings.queue_ttl == 0


def test_environment_overrides_every_kind_of_key():
    settings = load_settings(
        {
            "EAS_QUEUE_TOKENS": "a, b",
            "EAS_QUEUE_RETRY_INTERVALS": "0.5,2",
            "EAS_QUEUE_MAX_QUEUE_LENGTH": "7",
            "EAS_QUEUE_FORWARD_TIMEOUT": "2.5",
            "EAS_QUEUE_LISTED_SERVICES_ONLY": "true",
            "REDIS_URL": "redis://other:6380/1",
            "TARGET_API_BASE_URL": "http://model:9000/",
        }
    )
    assert settings.tokens == ("a", "b")
    assert settings.retry_intervals == (0.5, 2)
    assert settings.max_queue_length == 7
    assert settings.forward_timeout == 2.5
    assert settings.listed_services_only is True
    assert settings.redis_url == "redis://other:6380/1"
    assert settings.target_api_base_url == "http://model:9000"


def test_prefixed_variable_wins_over_bare_one():
    settings = load_settings({"REDIS_URL": "redis://bare:1/0", "EAS_QUEUE_REDIS_URL": "redis://prefixed:2/0"})
    assert settings.redis_url == "redis://prefixed:2/0"


def test_a_settings_file_is_laid_over_the_defaults(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(
        'tokens = ["site"]\n[services.big]\ntarget_api_base_url = "https://gpu:8443"\ntokens = ["big-token"]\n'
    )
    settings = load_settings({"EAS_QUEUE_SETTINGS": str(path)})
    assert settings.tokens == ("site",)
    assert settings.result_ttl == 3600  # untouched defaults stay
    assert settings.target_for("big") == "https://gpu:8443"
    assert settings.tokens_for("big") == ("big-token",)
    assert settings.target_for("other") == "http://localhost:5001"
    assert settings.tokens_for("other") == ("site",)


@pytest.mark.parametrize(
    "environ, key",
    [
        ({"EAS_QUEUE_TOKENS": ""}, "tokens"),
        ({"EAS_QUEUE_MAX_BODY_BYTES": "ten"}, "max_body_bytes"),
        ({"EAS_QUEUE_MAX_QUEUE_LENGTH": "0"}, "max_queue_length"),
        ({"EAS_QUEUE_RETRY_INTERVALS": "1,-5"}, "retry_intervals"),
        ({"EAS_QUEUE_REDIS_URL": "http://x"}, "redis_url"),
        ({"EAS_QUEUE_TARGET_API_BASE_URL": "localhost:5001"}, "target_api_base_url"),
        ({"EAS_QUEUE_LISTED_SERVICES_ONLY": "maybe"}, "listed_services_only"),
        ({"EAS_QUEUE_NO_SUCH_THING": "1"}, "EAS_QUEUE_NO_SUCH_THING"),
    ],
)
def test_bad_values_name_their_key(environ, key):
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    assert raised.value.key == key


@pytest.mark.parametrize(
    "toml, key",
    [
        ("max_body_bytes = '10'", "max_body_bytes"),
        ("tokens = []", "tokens"),
        ("colour = 'blue'", "colour"),
        ("[services.x]\nurl = 'http://a'", "services.x.url"),
        ("[services.'bad/name']\ntokens = ['t']", "services.bad/name"),
    ],
)
def test_bad_files_name_their_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as raised:
        load_settings({"EAS_QUEUE_SETTINGS": str(path)})
    assert raised.value.key == key


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "gunicorn"), "-c", "python:server", "--no-control-socket", "--bind", "127.0.0.1:0", "eas_queue:app"],
        [str(BIN / "rq"), "worker", "-w", "worker.QueueWorker", "high", "default"],
        [str(BIN / "flask"), "--app", "eas_queue", "routes"],
    ],
    ids=["gunicorn", "rq-worker", "flask"],
)
def test_a_bad_setting_stops_the_process_at_start_with_one_line(command):
    env = service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1", max_queue_length="lots")
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    ours = [line for line in finished.stderr.splitlines() if line.startswith("eas-queue:")]
    assert ours == ["eas-queue: bad setting max_queue_length: must be a number, not 'lots'"]


def test_a_sentinel_url_is_accepted_and_read_the_same_by_api_and_workers():
    url = "redis+sentinel://:s%40cret@s1:26379,s2:26380/mymaster/2"
    assert load_settings({"REDIS_URL": url}).redis_url == url
    target = parse_sentinel_url(url)
    assert target == SentinelTarget((("s1", 26379), ("s2", 26380)), "mymaster", 2, None, "s@cret")
    # `rq worker --config worker` gets RQ's SENTINEL dict, and no REDIS_URL (RQ would read that first).
    redis_url, sentinel = rq_cli_settings(url, 2.0)
    assert redis_url is None and sentinel is not None
    assert sentinel["INSTANCES"] == [("s1", 26379), ("s2", 26380)]
    assert (sentinel["MASTER_NAME"], sentinel["DB"]) == ("mymaster", 2)
    assert sentinel["PASSWORD"] == "s@cret" and sentinel["SENTINEL_KWARGS"]["socket_timeout"] == 2.0
    assert rq_cli_settings("redis://h:1/0", 2.0) == ("redis://h:1/0", None)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("redis+sentinel://s1:26379", "the master's name (as in `sentinel monitor`) is missing"),
        ("redis+sentinel://:secret@s1:port/mymaster", "'s1:port' is not a sentinel's host:port"),
        ("redis+sentinel://s1:26379,/mymaster", "'' is not a sentinel's host:port"),
        ("redis+sentinel://s1:26379/mymaster/first", "the db must be a number, not 'first'"),
        ("redis+sentinel://s1:26379/mymaster/0/extra", "the master's name"),
        ("redis+sentinel://s1:26379/mymaster?socket_timeout=1", "no query (timeouts come from redis_timeout)"),
        ("redis+sentinel:///mymaster", "no sentinel host"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_one_line_saying_why(url, problem):
    with pytest.raises(SettingsError) as raised:
        load_settings({"EAS_QUEUE_REDIS_URL": url})
    message = str(raised.value)
    assert raised.value.key == "redis_url"
    assert message.startswith(f"redis_url: must look like {SENTINEL_FORM}")
    assert problem in message and "\n" not in message and "secret" not in message


def test_the_worker_refuses_a_malformed_sentinel_url_at_start_with_one_line():
    env = service_env("redis+sentinel://127.0.0.1:1", "http://127.0.0.1:1")
    command = [str(BIN / "rq"), "worker", "-w", "worker.QueueWorker", "--config", "worker", "high", "default"]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    ours = [line for line in finished.stderr.splitlines() if line.startswith("eas-queue:")]
    missing = "the master's name (as in `sentinel monitor`) is missing"
    assert ours == [f"eas-queue: bad setting redis_url: must look like {SENTINEL_FORM}: {missing}"]
