"""A real WebSocket peer for tests (the `websockets` library).

server PORT            echo every message back, prefixed with "echo:"; prints
                       "ready" once listening, one JSON line per handshake
                       (the path and headers it saw, names lowercase) and "closed" per close.
client URL ADDR CAFILE connect to URL (host and SNI from it) at ADDR (host:port),
        IDLE_WAIT      trusting CAFILE; send two messages, check the echoes,
                       then stay silent and report when the edge closes the
                       connection; prints one JSON line with the outcome.
"""
import asyncio
import json
import ssl
import sys
import time

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def run_server(port):
    async def echo(connection):
        request = connection.request
        print(json.dumps({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.raw_items()}}), flush=True)
        try:
            async for message in connection:
                await connection.send("echo:" + message)
        except websockets.ConnectionClosed:
            pass
        print("closed", flush=True)

    async with serve(echo, "127.0.0.1", port, ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()


async def run_client(url, addr, cafile, idle_wait):
    host, port = addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=cafile)
    outcome = {"echoes": [], "closed_after": None, "close_code": None}
    async with connect(url, ssl=context, host=host, port=int(port), ping_interval=None, open_timeout=10) as ws:
        for message in ["hello", "x" * 70000]:
            await ws.send(message)
            outcome["echoes"].append(await asyncio.wait_for(ws.recv(), 10))
        started = time.monotonic()
        try:
            await asyncio.wait_for(ws.recv(), idle_wait)
        except websockets.ConnectionClosed as closed:
            outcome["closed_after"] = time.monotonic() - started
            outcome["close_code"] = closed.rcvd.code if closed.rcvd else None
        except asyncio.TimeoutError:
            pass
    outcome["echoes"] = [e[:20] + "...(%d)" % len(e) for e in outcome["echoes"]]
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(run_server(int(sys.argv[2])))
    else:
        asyncio.run(run_client(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
