"""A model API that takes `delay` seconds per request yet holds hundreds of requests at once cheaply.

    python bench/slow_model.py PORT DELAY

One asyncio loop with a minimal HTTP/1.1 keep-alive parser (Content-Length bodies only, which is what
`requests` sends), so the model itself is never the limit of a drain against a slow model: what the
bench measures is how many requests the workers keep in flight.
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = b'{"ok":true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Serves one connection: request after request until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, head.startswith(b"HTTP/1.0")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(delay)
            writer.write(RESPONSE)
            if close:
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, delay: float) -> None:
    """Listens on loopback until killed."""
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, delay), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
