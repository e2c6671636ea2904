"""A real WebSocket peer for tests (the `websockets` library).

server PORT            echo every text message back prefixed with "echo:" and
                       every binary one unchanged; prints "ready" once
                       listening, one JSON line per handshake (the path and
                       headers it saw, names lowercase) and "closed CODE" per
                       close (the code the client sent, 1006 for none).
client URL ADDR CAFILE connect to URL (host and SNI from it) at ADDR (host:port),
        IDLE_WAIT      trusting CAFILE; send two messages, check the echoes,
                       then stay silent and report when the edge closes the
                       connection; prints one JSON line with the outcome.
"""
import asyncio
import json
import os
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
                await connection.send(message if isinstance(message, bytes) else "echo:" + message)
        except websockets.ConnectionClosed:
            pass
        rcvd = connection.protocol.close_rcvd
        code = rcvd.code if rcvd else 1006
        print(f"closed {code}", flush=True)

    async with serve(echo, "127.0.0.1", port, ping_interval=None, max_size=MAX_MESSAGE):
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


async def run_bulk(url, addr, cafile, mib, code):
    host, port = addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=cafile)
    outcome = {"sent": 0, "received": 0}
    started = time.monotonic()
    # No permessage-deflate: every byte crosses the edge as sent.
    async with connect(url, ssl=context, host=host, port=int(port), ping_interval=None, open_timeout=10,
                       max_size=MAX_MESSAGE, compression=None) as ws:
        for i in range(mib):
            message = os.urandom(MIB)
            await ws.send(message)
            outcome["sent"] += len(message)
            echo = await asyncio.wait_for(ws.recv(), 30)
            if echo != message:
                raise SystemExit(f"echo {i} differs from what was sent")
            outcome["received"] += len(echo)
        await ws.close(code, "done")
        outcome["close_sent"] = ws.protocol.close_sent.code if ws.protocol.close_sent else None
        outcome["close_received"] = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
    outcome["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(outcome), flush=True)


MIB = 1 << 20
MAX_MESSAGE = 4 * MIB

if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(run_server(int(sys.argv[2])))
    elif sys.argv[1] == "bulk":
        asyncio.run(run_bulk(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
    else:
        asyncio.run(run_client(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
