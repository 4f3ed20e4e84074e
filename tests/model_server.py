"""A real HTTP server standing in for the model API, steered by the query parameters each request carries.

The queue forwards non-reserved query parameters, so a test says how the model should treat a request
when it submits it:
  status=<code>          answer with this status (default 200)
  fail_first=<n>         answer `fail_status` (default 503) to the first n attempts of this request id
  delay=<seconds>        wait before answering
  echo=1                 answer with the request's own body and Content-Type
  answer=<text>          answer with this text, as `content_type` (default application/json)
  size=<n>               answer n bytes (application/octet-stream), with Content-Length, or
  chunked=1              without it (Transfer-Encoding: chunked, 1 MB chunks)
  drip=<seconds>         send the answer's body one byte at a time, this far apart;
  drip_head=1            from the status line on
Every request is recorded (arrival time, request id, path, raw and parsed query, headers, body) for the test
to inspect, and then how many bytes of the answer the model could send before the client hung up (`sent`,
and `finished`: True if the whole answer went out, False if the client closed the connection first).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"


@dataclass
class Received:
    at: float
    request_id: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int]  # the TCP connection it came on: reused connections repeat it
    raw_query: str = ""  # the query string exactly as it arrived
    sent: int = 0  # bytes of the answer's body written so far
    finished: bool | None = None  # None while answering
    answered_at: float | None = None  # when its status line went out: from then the client may have it


@dataclass
class ModelServer:
    port: int = 0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _connections: set[socket.socket] = field(default_factory=set)

    def start(self) -> ModelServer:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with model.lock:
                    model._connections.add(self.connection)

            def finish(self) -> None:
                with model.lock:
                    model._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                url = urlsplit(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                request_id = self.headers.get(REQUEST_ID_HEADER, "")
                record = Received(
                    time.time(), request_id, url.path, query, dict(self.headers.items()), body, self.client_address
                )
                record.raw_query = url.query
                with model.lock:
                    model.received.append(record)
                    attempt = sum(1 for r in model.received if r.request_id == request_id)
                self.record = record
                self.answer(record, query, attempt, body)

            def send_response(self, code: int, message: str | None = None) -> None:
                record = getattr(self, "record", None)
                if record is not None and record.answered_at is None:
                    record.answered_at = time.time()
                super().send_response(code, message)

            def answer(self, record: Received, query: dict[str, list[str]], attempt: int, body: bytes) -> None:
                if "delay" in query:
                    time.sleep(float(query["delay"][0]))
                status = int(query.get("status", ["200"])[0])
                if attempt <= int(query.get("fail_first", ["0"])[0]):
                    status = int(query.get("fail_status", ["503"])[0])
                if "size" in query:
                    self.answer_size(record, status, int(query["size"][0]), "chunked" in query)
                    return
                if "drip" in query:
                    self.drip(record, status, float(query["drip"][0]), "drip_head" in query)
                    return
                if "echo" in query and status < 300:
                    content_type = self.headers.get("Content-Type", "application/octet-stream")
                    answer = body
                else:
                    content_type = query.get("content_type", ["application/json"])[0]
                    about = {"request_id": record.request_id, "attempt": attempt, "path": record.path}
                    answer = query["answer"][0].encode() if "answer" in query else json.dumps(about).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                record.sent, record.finished = len(answer), True

            def answer_size(self, record: Received, status: int, size: int, chunked: bool) -> None:
                block = b"x" * min(size, 1 << 20)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    while record.sent < size:
                        part = block[: size - record.sent]
                        self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                        record.sent += len(part)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    record.finished = True
                except OSError:  # the client hung up before the whole answer went out
                    record.finished = False
                    self.close_connection = True

            def drip(self, record: Received, status: int, every: float, from_head: bool) -> None:
                body = b'{"dripped": true}'
                head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n"
                try:
                    if not from_head:
                        self.wfile.write(head.encode())
                    for byte in (head.encode() if from_head else b"") + body:
                        time.sleep(every)  # the model's own pace, not a wait of the test's
                        self.wfile.write(bytes([byte]))
                        record.sent += 1
                    record.finished = True
                except OSError:
                    record.finished = False
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a worker SIGKILLed mid-request leaves a broken connection: expected here

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stops answering and closes the port: the queue sees connection errors until start()."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_for(self, request_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.request_id == request_id]

    def most_at_once(self, request_ids: Iterable[str]) -> int:
        """The most of these requests the model held at the same time, each from its arrival until its answer
        began (stamped before the answer is sent, so a client's next request on the same slot comes after)."""
        wanted = set(request_ids)
        with self.lock:
            spans = [(r.at, r.answered_at or time.time()) for r in self.received if r.request_id in wanted]
        events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # ends first
        most = now = 0
        for _, change in events:
            now += change
            most = max(most, now)
        return most

    def ids(self) -> list[str]:
        with self.lock:
            return [r.request_id for r in self.received]
