"""WebSocket echo server and client for the e2e tests (Python `websockets`, installed by
scripts/setup into target/test-venv).

    echo.py serve HOST:PORT NAME     prints "ready", then echoes every message as "NAME:<msg>"
                                     (binary messages unchanged); the first message the server
                                     sends is a hello with the request's XFCC header.
    echo.py client URL COUNT         connects, checks the hello, sends COUNT text messages and one
                                     1 MiB binary message, checks every echo, prints one JSON line.
"""
import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def run_server(addr, name):
    host, port = addr.rsplit(":", 1)

    async def handler(ws):
        xfcc = ws.request.headers.get("x-forwarded-client-cert", "")
        await ws.send(json.dumps({"hello": name, "xfcc": xfcc, "path": ws.request.path}))
        async for msg in ws:
            await ws.send(msg if isinstance(msg, bytes) else f"{name}:{msg}")

    async with serve(handler, host, int(port), max_size=4 << 20, subprotocols=["echo.v1"]):
        print("ready", flush=True)
        await asyncio.Future()


async def run_client(url, count):
    async with connect(url, max_size=4 << 20, subprotocols=["echo.v1"], open_timeout=10) as ws:
        hello = json.loads(await ws.recv())
        name = hello["hello"]
        echoed = 0
        for i in range(count):
            await ws.send(f"m{i}")
            got = await ws.recv()
            if got != f"{name}:m{i}":
                raise SystemExit(f"message {i}: got {got!r}")
            echoed += 1
        blob = os.urandom(1 << 20)
        await ws.send(blob)
        if await ws.recv() != blob:
            raise SystemExit("the 1 MiB binary message came back altered")
        await ws.ping()
        print(json.dumps({
            "server": name,
            "xfcc": hello["xfcc"],
            "path": hello["path"],
            "subprotocol": ws.subprotocol,
            "echoed": echoed,
            "binary_ok": True,
        }), flush=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        asyncio.run(run_server(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "client":
        asyncio.run(run_client(sys.argv[2], int(sys.argv[3])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
