#!/usr/bin/env python3
"""Where a request's time goes inside each proxy, read from its system
calls: `perf trace` on the proxy while one client sends requests one at a
time, spaced 20 ms apart so each request's calls stand alone, then per
request:

  in:   the client's request read -> the request written to the upstream
  up:   written to the upstream -> the upstream's answer read (the stub and
        the loopback network: the same for every proxy)
  out:  the answer read -> the answer written to the client

and how many system calls, epoll waits and threads each request took.
Tracing slows every call a little, alike for each proxy; compare the
proxies with each other, not with bench.py's figures.

  python3 bench/latency-trace.py [BINARY|nginx ...]
  (default: target/release/matrix-edge and nginx)

Needs perf (Debian: linux-perf) and what bench/run installs.
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py's stub upstreams and proxy configs)

RATE = 50
SECONDS = 6
READS = {"read", "recvfrom", "recvmsg", "readv"}
WRITES = {"write", "writev", "sendto", "sendmsg"}
# "  12.345 ( 0.010 ms): thread name/tid call(args) = result"; thread names
# hold spaces, and a process with one thread has none.
LINE = re.compile(r"^\s*([\d.]+) \(\s*([\d.]+) ms\): (?:(.+?)/(\d+) )?(\w+)\((.*)\)\s+= (-?\d+)")


def start(setup, proxy):
    plain, tls = bench.free_port(), bench.free_port()
    command = bench.proxy_command(setup, proxy, plain, tls, "trace")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.wait_port(plain)
    return process, plain


def calls(path):
    """(start ms, duration ms, thread, name, fd, result) per completed call."""
    out = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            # Not stdio: a log line to stderr is not the request going on.
            fd = re.match(r"fd: (\d+)", m.group(6))
            fd = int(fd.group(1)) if fd and int(fd.group(1)) > 2 else None
            out.append((float(m.group(1)), float(m.group(2)), int(m.group(4) or 0), m.group(5), fd, int(m.group(7))))
    return out


def per_request(trace):
    """Splits each thread's calls at a request read after a quiet gap; a
    request's calls are every thread's between its read and its answer
    (timer ticks left out)."""
    requests = []
    by_thread = {}
    for call in trace:
        by_thread.setdefault(call[2], []).append(call)
    for calls_of_thread in by_thread.values():
        current, last_end = None, -1e9
        for at, took, _tid, name, fd, result in calls_of_thread:
            if fd is None and name in READS | WRITES:
                last_end = at + took
                continue
            if current is None and name in READS and result > 0 and at - last_end > 5:
                current = {"client": fd, "start": at, "in": at + took, "upstream": None}
            elif current is not None:
                if current["upstream"] is None and name in WRITES and fd != current["client"] and result > 0:
                    current["upstream"], current["up_write"] = fd, at
                elif current["upstream"] is not None and "up_read" not in current and name in READS \
                        and fd == current["upstream"] and result > 0:
                    current["up_read"] = at + took
                elif "up_read" in current and name in WRITES and fd == current["client"] and result > 0:
                    current["out"] = at
                    requests.append(current)
                    current = None
            # Waiting for events is the quiet itself.
            if not name.startswith("epoll"):
                last_end = at + took
    for request in requests:
        request["calls"] = [c for c in trace if request["start"] <= c[0] <= request["out"] and c[3] != "clock_nanosleep"]
    return [r for r in requests if "up_write" in r]


def measure(setup, proxy):
    process, plain = start(setup, proxy)
    out = os.path.join(setup.work, "trace.txt")
    try:
        urls = [f"http://127.0.0.1:{plain}{p}" for p in setup.paths]
        bench.h2load(["--h1", "-c", "1", "-t", "1", "-n", "200"], urls)  # warm the upstream connections
        tracer = subprocess.Popen(["perf", "trace", "-p", str(process.pid), "-o", out],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        log = os.path.join(setup.work, "trace-latency.log")
        bench.h2load(["--h1", "-c", "1", "-t", "1", "--rps", str(RATE), "-D", str(SECONDS), "--log-file", log], urls)
        tracer.terminate()
        tracer.wait()
        p50, p99 = bench.percentiles(log)
    finally:
        process.terminate()
        process.wait()
    requests = per_request(calls(out))
    if len(requests) < RATE * SECONDS // 2:
        raise SystemExit(f"latency-trace: {proxy}: only {len(requests)} requests found in the trace ({out})")
    med = lambda values: statistics.median(values) * 1000  # noqa: E731  (ms -> µs)
    return {
        "requests": len(requests),
        "p50_ms": p50,
        "in_us": med([r["up_write"] - r["in"] for r in requests]),
        "up_us": med([r["up_read"] - r["up_write"] for r in requests]),
        "out_us": med([r["out"] - r["up_read"] for r in requests]),
        "calls": statistics.median([len(r["calls"]) for r in requests]),
        "epoll_waits": statistics.median([sum(1 for c in r["calls"] if c[3].startswith("epoll")) for r in requests]),
        "threads": statistics.median([len({c[2] for c in r["calls"]}) for r in requests]),
        "in_call_us": med([sum(c[1] for c in r["calls"]) for r in requests]),
    }


def bursts(setup, proxy):
    """p50 and p99 at 500 requests/s in all, from 1, 5 and 20 connections:
    h2load starts every connection's rate timer together, so N connections
    send N requests at once, and a proxy with one thread answers them one
    after another."""
    process, plain = start(setup, proxy)
    try:
        urls = [f"http://127.0.0.1:{plain}{p}" for p in setup.paths]
        bench.h2load(["--h1", "-c", "20", "-t", "1", "-n", "2000"], urls)
        out = {}
        for clients in (1, 5, 20):
            log = os.path.join(setup.work, f"bursts-{clients}.log")
            bench.h2load(["--h1", "-c", str(clients), "-t", "1", "--rps", str(500 // clients), "-D", "5",
                          "--log-file", log], urls)
            out[clients] = bench.percentiles(log)
        return out
    finally:
        process.terminate()
        process.wait()


def main():
    proxies = sys.argv[1:] or [os.path.join(bench.ROOT, "target/release/matrix-edge"), "nginx"]
    if not shutil.which("perf"):
        raise SystemExit("latency-trace: needs perf (apt-get install linux-perf)")
    work = tempfile.mkdtemp(prefix="matrix-edge-latency-trace-")
    os.chmod(work, 0o755)
    setup = bench.Setup(work)
    try:
        setup.start_stub()
        rows = [(proxy, measure(setup, proxy)) for proxy in proxies]
        burst_rows = [(proxy, bursts(setup, proxy)) for proxy in proxies]
    finally:
        setup.stop()
    print("| proxy | requests | client p50 ms | in µs | upstream µs | out µs | calls | epoll waits | threads | µs inside calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for proxy, r in rows:
        print(f"| {os.path.basename(proxy)} | {r['requests']} | {r['p50_ms']:.2f} | {r['in_us']:.0f} | {r['up_us']:.0f} | "
              f"{r['out_us']:.0f} | {r['calls']:.0f} | {r['epoll_waits']:.0f} | {r['threads']:.0f} | {r['in_call_us']:.0f} |")
    print()
    print("| proxy | p50 / p99 ms, 1 connection at 500/s | 5 at 100/s | 20 at 25/s |")
    print("|---|---|---|---|")
    for proxy, r in burst_rows:
        print(f"| {os.path.basename(proxy)} | " + " | ".join(f"{r[n][0]:.2f} / {r[n][1]:.2f}" for n in (1, 5, 20)) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
