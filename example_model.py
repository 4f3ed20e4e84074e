"""A small example model API for `make run`: answers every prediction with a summary of its input.

Replace it with your model: eas-queue POSTs each request to <target_api_base_url>/api/predict/<service>.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/api/predict/<service>")
@app.post("/api/predict/<service>/<path:subpath>")
def predict(service: str, subpath: str = "") -> Response:
    payload = request.get_json(silent=True)
    numbers = payload.get("input") if isinstance(payload, dict) else None
    answer = {
        "service": service,
        "subpath": subpath,
        "request_id": request.headers.get("X-Eas-Queueservice-Request-Id"),
        "received_bytes": len(request.get_data()),
    }
    if isinstance(numbers, list) and all(isinstance(n, (int, float)) for n in numbers):
        answer["prediction"] = sum(numbers)
    return jsonify(answer)
