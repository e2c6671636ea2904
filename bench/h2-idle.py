#!/usr/bin/env python3
"""What an open HTTP/2 connection costs matrix-edge and nginx, in one run.

Both proxies get the same certificate, one worker, and the same stub
upstreams as bench/bench.py. For each proxy, in turn:
  idle: N TLS HTTP/2 connections, one small request each, then held open
        with no stream: RSS after minus RSS before, divided by N;
  sync: N more TLS HTTP/2 connections, each with one /sync long-poll held
        in flight at the upstream (60 s): the same figure.
RSS is read SETTLE seconds (default 6: past the allocator's purge delay)
after the last connection is in place. Prints a Markdown table; asserts
nothing.
  python3 bench/h2-idle.py [N] [BINARY]
Run through bench/run-h2-idle (it installs the tools and builds matrix-edge)."""
import os
import socket
import ssl
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the stub upstreams, proxies and RSS helpers)

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BINARY = sys.argv[2] if len(sys.argv) > 2 else None
SETTLE = float(os.environ.get("SETTLE", "6"))
HOST = bench.HOST
SETTINGS, HEADERS, DATA = 4, 1, 0
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(index, value):
    """An HPACK literal without indexing whose name is static table entry `index`."""
    return bytes([index]) + bytes([len(value)]) + value


def get_head(path):
    # :method GET (2), :scheme https (7), :authority (1), :path (4)
    return b"\x82\x87" + literal(1, HOST.encode()) + literal(4, path.encode())


def read_frame(s):
    head = b""
    while len(head) < 9:
        chunk = s.recv(9 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    length = struct.unpack(">I", b"\x00" + head[:3])[0]
    payload = b""
    while len(payload) < length:
        chunk = s.recv(length - len(payload))
        if not chunk:
            raise ConnectionError("closed")
        payload += chunk
    return head[3], head[4], struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF, payload


CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE
CONTEXT.set_alpn_protocols(["h2"])


def open_h2(port, path, wait_answer):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = CONTEXT.wrap_socket(raw, server_hostname=HOST)
    if s.selected_alpn_protocol() != "h2":
        raise SystemExit(f"h2-idle: port {port} did not negotiate h2")
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0)
              + frame(HEADERS, END_STREAM | END_HEADERS, 1, get_head(path)))
    acked = False
    while wait_answer or not acked:
        kind, flags, stream, _ = read_frame(s)
        if kind == SETTINGS and not flags & ACK:
            s.sendall(frame(SETTINGS, ACK, 0))
            acked = True
        if stream == 1 and kind in (HEADERS, DATA) and flags & END_STREAM:
            break
    return s


def held(pids, port, path, wait_answer):
    before = bench.rss_kib(pids)
    sockets = [open_h2(port, path, wait_answer) for _ in range(N)]
    time.sleep(SETTLE)
    after = bench.rss_kib(pids)
    for s in sockets:
        s.close()
    time.sleep(1)
    return (after - before) / N


def main():
    work = tempfile.mkdtemp(prefix="matrix-edge-h2-idle-")
    setup = bench.Setup(work)
    results = {}
    try:
        setup.start_sink()
        setup.start_stub()
        ports = {"matrix-edge": (bench.free_port(), bench.free_port()), "nginx": (bench.free_port(), bench.free_port())}
        proxies = {"matrix-edge": setup.start_edge(*ports["matrix-edge"], binary=BINARY),
                   "nginx": setup.start_nginx_proxy(*ports["nginx"])}
        for name, process in proxies.items():
            pids = bench.children(process.pid)
            tls = ports[name][1]
            # Warm both alike: TLS session machinery, the first upstream connection.
            for s in [open_h2(tls, "/_matrix/client/versions", True) for _ in range(50)]:
                s.close()
            time.sleep(1)
            idle = held(pids, tls, "/_matrix/client/versions", True)
            sync = held(pids, tls, "/_matrix/client/v3/sync?longpoll=1&timeout=60000", False)
            results[name] = (idle, sync)
            print(f"{name}: {idle:.1f} KiB per idle h2 connection, {sync:.1f} KiB per connection with a /sync in flight",
                  flush=True)
    finally:
        setup.stop()
    edge, nginx = results["matrix-edge"], results["nginx"]
    print(f"\n| {N} TLS HTTP/2 connections | matrix-edge KiB each | nginx KiB each | ratio |")
    print("|---|---|---|---|")
    print(f"| idle after one request | {edge[0]:.1f} | {nginx[0]:.1f} | {edge[0] / nginx[0]:.2f} |")
    print(f"| one /sync in flight | {edge[1]:.1f} | {nginx[1]:.1f} | {edge[1] / nginx[1]:.2f} |")


if __name__ == "__main__":
    main()
