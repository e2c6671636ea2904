#!/usr/bin/env python3
"""Balancing scenarios: matrix-edge beside HAProxy and nginx in one run.

Stand-in workers are single-threaded Python processes (one event loop, as a
Synapse worker is). Two scenarios, each through every proxy in turn:

- stall: two client_reader workers, 16 clients asking as fast as they are
  answered; one worker is stopped with SIGSTOP for 10 s. Reported: the
  share of requests issued during the stall answered 200 within 2 s, and
  the throughput during the stall against before it.
- overload: one worker that takes 200 ms per request (5/s at most), 48
  clients for 10 s. Reported: goodput (200s per second), the p99 of
  admitted requests, requests shed (503) and the slowest 503.

Proxies: matrix-edge (defaults for the stall; max_in_flight 2 and a queue
of 8 for 1 s for the overload), HAProxy as Element Server Suite configures
it (round robin, maxconn 500, /health every 2 s, option redispatch; for the
overload maxconn 2 and timeout queue 1s), HAProxy with leastconn and
`observe layer7`, and nginx (round robin, max_fails=1 fail_timeout=10s).

Run: python3 bench/balancing.py (after `cargo build --release`); prints a
Markdown table. BENCH_QUICK=1 shortens every phase.
"""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("BENCH_QUICK") == "1"
STALL = 4.0 if QUICK else 10.0
OVERLOAD = 5.0 if QUICK else 10.0
TARGET = "/_matrix/client/v3/publicRooms"

WORKER = r'''
import asyncio, sys, time
name, port, service = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
body = ('{"worker":"%s"}' % name).encode()
head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
async def serve(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            if service and not line.startswith(b"GET /health "):
                time.sleep(service)  # blocks the loop: one request at a time
            writer.write(head + body)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Run:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="balancing-")
        self.processes = []

    def spawn(self, args, name):
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(f"{self.work}/{name}.err", "w"))
        self.processes.append(process)
        return process

    def worker(self, name, service=0.0):
        port = free_port()
        process = self.spawn([sys.executable, "-c", WORKER, name, str(port), str(service)], name)
        wait_port(port)
        return port, process

    def stop_all(self):
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.processes = []

    def write(self, name, text):
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def edge(self, listen, main, workers, capped):
        balancing = "\n  balancing: { max_in_flight: 2, queue: { size: 8, timeout: 1s } }" if capped else ""
        members = ", ".join(f'"127.0.0.1:{p}"' for p in workers)
        config = self.write("edge.yaml", f"""server_name: example.com
listeners: [{{ address: "127.0.0.1:{listen}", serves: [client] }}]
synapse:
  main: "127.0.0.1:{main}"
  workers:
    client_reader: [{members}]{balancing}
limits: {{ connections_per_ip: 0 }}
process: {{ threads: 1, access_log: off, log_level: warn }}
""")
        self.spawn([os.path.join(ROOT, "target/release/matrix-edge"), "-c", config], "edge")

    def haproxy(self, listen, main, workers, capped, least):
        maxconn = 2 if capped else 500
        queue = "1s" if capped else "60s"
        balance = "leastconn" if least else "roundrobin"
        observe = " observe layer7 error-limit 10 on-error mark-down" if least else ""
        servers = "\n".join(
            f"  server w{i} 127.0.0.1:{p} maxconn {maxconn} check inter 2s{observe}" for i, p in enumerate(workers))
        config = self.write("haproxy.cfg", f"""global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout queue {queue}
  option http-keep-alive
  option redispatch
  retries 3
frontend plain
  bind 127.0.0.1:{listen}
  use_backend client_reader if {{ path_beg /_matrix/client/v3/publicRooms }}
  default_backend main
backend client_reader
  balance {balance}
  option httpchk GET /health
{servers}
backend main
  server main 127.0.0.1:{main}
""")
        self.spawn(["haproxy", "-f", config], "haproxy")

    def nginx(self, listen, main, workers):
        servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in workers)
        config = self.write("nginx.conf", f"""worker_processes 1; daemon off; pid {self.work}/nginx.pid;
error_log {self.work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream client_reader {{ {servers} keepalive 64; }}
  upstream main {{ server 127.0.0.1:{main}; keepalive 16; }}
  server {{ listen 127.0.0.1:{listen};
    proxy_http_version 1.1; proxy_set_header Connection "";
    location /_matrix/client/v3/publicRooms {{ proxy_pass http://client_reader; }}
    location / {{ proxy_pass http://main; }}
  }}
}}
""")
        self.spawn(["nginx", "-p", self.work, "-c", config], "nginx")


def load(port, clients, stop, after_503=0.05):
    """(issued, took, status) of every request from `clients` keep-alive threads."""
    outcomes = []
    lock = threading.Lock()

    def client():
        mine = []
        sock, reader = None, None
        while not stop.is_set():
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(120)
                reader = sock.makefile("rb")
            issued = time.monotonic()
            status = 0
            try:
                sock.sendall(f"GET {TARGET} HTTP/1.1\r\nHost: matrix.example.com\r\n\r\n".encode())
                line = reader.readline()
                status = int(line.split()[1])
                length, closing = 0, False
                while True:
                    header = reader.readline()
                    if header in (b"\r\n", b""):
                        break
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    if name.lower() == "connection" and "close" in value.lower():
                        closing = True
                reader.read(length)
                if closing:
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError):
                sock.close()
                sock = None
            mine.append((issued, time.monotonic() - issued, status))
            if status == 503:
                time.sleep(after_503)
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, outcomes


def stall_scenario(run, proxy):
    main, _ = run.worker("main")
    (first, first_process), (second, _) = run.worker("first"), run.worker("second")
    listen = free_port()
    start_proxy(run, proxy, listen, main, [first, second], capped=False)
    wait_port(listen)
    time.sleep(2.5)  # first health checks
    stop = threading.Event()
    threads, outcomes = load(listen, 16, stop)
    started = time.monotonic()
    time.sleep(3)
    stalled = time.monotonic()
    first_process.send_signal(signal.SIGSTOP)
    time.sleep(STALL)
    resumed = time.monotonic()
    first_process.send_signal(signal.SIGCONT)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    run.stop_all()
    before = [o for o in outcomes if started + 0.5 <= o[0] < stalled]
    during = [o for o in outcomes if stalled <= o[0] < resumed]
    within = sum(1 for o in during if o[2] == 200 and o[1] <= 2.0)
    return {
        "within 2 s during the stall": f"{100.0 * within / max(len(during), 1):.3f} % of {len(during)}",
        "throughput during / before": f"{(len(during) / (resumed - stalled)) / max(len(before) / (stalled - started - 0.5), 1e-9):.2f}",
        "slowest during the stall": f"{max((o[1] for o in during), default=0):.1f} s",
        "failed (not 200)": str(sum(1 for o in outcomes if o[2] != 200)),
    }


def overload_scenario(run, proxy):
    main, _ = run.worker("main")
    slow, _ = run.worker("slow", service=0.2)
    listen = free_port()
    start_proxy(run, proxy, listen, main, [slow], capped=True)
    wait_port(listen)
    time.sleep(2.5)
    stop = threading.Event()
    threads, outcomes = load(listen, 48, stop)
    began = time.monotonic()
    time.sleep(OVERLOAD)
    ended = time.monotonic()
    stop.set()
    for t in threads:
        t.join()
    run.stop_all()
    # Goodput: 200s that arrived within the window. Latencies: of every
    # request issued within it, however late its answer came.
    goodput = sum(1 for o in outcomes if o[2] == 200 and began <= o[0] + o[1] <= ended)
    in_window = [o for o in outcomes if began <= o[0] < ended]
    admitted = sorted(o[1] for o in in_window if o[2] == 200)
    shed = [o[1] for o in in_window if o[2] == 503]
    p99 = admitted[len(admitted) * 99 // 100] if admitted else float("nan")
    return {
        "goodput (200/s)": f"{goodput / (ended - began):.1f}",
        "admitted p99": f"{p99:.2f} s",
        "admitted median": f"{statistics.median(admitted) if admitted else float('nan'):.2f} s",
        "shed (503)": str(len(shed)),
        "slowest 503": f"{max(shed, default=0):.2f} s",
        "other failures": str(sum(1 for o in in_window if o[2] not in (200, 503))),
        "answered after the window": str(sum(1 for o in outcomes if o[0] + o[1] > ended)),
    }


def start_proxy(run, proxy, listen, main, workers, capped):
    if proxy == "matrix-edge":
        run.edge(listen, main, workers, capped)
    elif proxy == "haproxy (ESS)":
        run.haproxy(listen, main, workers, capped, least=False)
    elif proxy == "haproxy leastconn+observe":
        run.haproxy(listen, main, workers, capped, least=True)
    elif proxy == "nginx":
        run.nginx(listen, main, workers)


PROXIES = ["matrix-edge", "haproxy (ESS)", "haproxy leastconn+observe", "nginx"]


def table(title, results):
    rows = list(next(iter(results.values())).keys())
    lines = [f"### {title}", "", "| | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(results[p][row] for p in results) + " |")
    return "\n".join(lines)


def main():
    run = Run()
    try:
        stall = {p: stall_scenario(run, p) for p in PROXIES}
        overload = {p: overload_scenario(run, p) for p in PROXIES}
    finally:
        run.stop_all()
    print(table(f"Stall: one of two workers stopped (SIGSTOP) for {STALL:.0f} s, 16 clients", stall))
    print()
    print(table(f"Overload: one worker at 200 ms per request, 48 clients for {OVERLOAD:.0f} s", overload))


if __name__ == "__main__":
    main()
