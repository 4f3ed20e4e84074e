"""The README's quick-start `curl` examples, run as written against the processes `make run` starts."""

import json
import os
import re
import signal
import subprocess
import uuid

import requests

from tests.conftest import BIN, ROOT, free_port, wait_for


def quick_start_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("With it running") : readme.index("The dashboard is at")]
    return [block for block in re.findall(r"```bash\n(.*?)```", section, re.S) if "curl" in block]


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_the_readme_examples_work_as_written(tmp_path):
    submit, priority_submit, sink, cancel = quick_start_blocks()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAS_QUEUE_")}
    # The Procfile as is; only Redis moves off 6379, which belongs to the machine.
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_DIR=str(tmp_path / "redis"),
    )
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [BIN / "honcho", "start"], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_for(lambda: answers("http://localhost:5000/healthz"), 60, "make run's API")
        wait_for(lambda: "Listening on high, default" in (tmp_path / "honcho.log").read_text(), 60, "its workers")
        script = f"""set -euo pipefail
{submit}
echo ---
{priority_submit}
echo ---
for attempt in $(seq 100); do
  out=$({sink})
  if [[ $out == *'"SUCCESS"'* ]]; then break; fi
  sleep 0.1
done
echo "$out"
echo ---
{cancel}"""
        finished = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        first, second, status, canceled = finished.stdout.split("---\n")
        assert first.startswith("HTTP/1.1 200 OK")
        assert re.search(r"X-Eas-Queueservice-Request-Id: [0-9a-f-]{36}", first)
        request_id = second.strip()
        assert str(uuid.UUID(request_id)) == request_id
        state = json.loads(status)
        assert state["request_id"] == request_id
        assert state["status"] == "SUCCESS"
        assert state["result"]["body"]["prediction"] == 15  # the example model sums the input
        assert json.loads(canceled) == {"error": "request has already ended", "status": "SUCCESS"}
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(30)
