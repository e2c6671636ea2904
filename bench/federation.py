#!/usr/bin/env python3
"""What the federation gate costs and what it saves (issue 26).

1. Verification cost: signed federation requests through matrix-edge with
   the gate off and in `enforce`, and through nginx (no verification) for
   reference, to one nginx stub: a small GET (a profile query) and a
   50-PDU transaction (POST, signed as POST: h2load cannot PUT, and the
   gate's work is the same for either method). CPU of the proxy's process
   per request (utime + stime over a fixed count), 3 interleaved rounds,
   medians.
2. A forged flood: 2,000 transactions of 50 PDUs with bad signatures from
   an origin whose keys Synapse and the edge can both fetch, sent on 8
   keep-alive connections through the edge to a real Synapse (from the
   test virtualenv), gate off and then in `enforce`; Synapse's CPU during
   each flood.

Run by bench/federation (which installs what it needs).
"""
import base64
import datetime
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGE = os.path.join(ROOT, "target/release/matrix-edge")
PYTHON = os.environ.get("MATRIX_EDGE_SYNAPSE_PYTHON", os.path.join(ROOT, ".dev/venv/bin/python"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", 20_000))
FLOOD = int(os.environ.get("BENCH_FLOOD", 2_000))
SERVER_NAME = "bench.local"
KEY_ID = "ed25519:bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def unpadded(raw):
    return base64.b64encode(raw).decode().rstrip("=")


def write_pki(work):
    """A CA and a leaf for localhost, PEM files in `work`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matrix-edge bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(work, f"{name}.pem") for name in ("ca", "leaf", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["leaf"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


class KeyServer(http.server.ThreadingHTTPServer):
    """The origin's `/_matrix/key/v2/server`, over TLS, for the name in Host."""
    daemon_threads = True

    def __init__(self, port, pki, signing_key):
        self.signing_key = signing_key
        super().__init__(("127.0.0.1", port), KeyHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki["leaf"], pki["key"])
        self.socket = context.wrap_socket(self.socket, server_side=True)


class KeyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        name = self.headers.get("Host", "")
        public = self.server.signing_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw)
        document = {"server_name": name, "valid_until_ts": int(time.time() * 1000) + 86_400_000,
                    "verify_keys": {KEY_ID: {"key": unpadded(public)}}, "old_verify_keys": {}}
        document["signatures"] = {name: {KEY_ID: unpadded(self.server.signing_key.sign(canonical(document)))}}
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def authorization(key, origin, method, uri, content=None):
    signed = {"method": method, "uri": uri, "origin": origin, "destination": SERVER_NAME}
    if content is not None:
        signed["content"] = content
    signature = unpadded(key.sign(canonical(signed)))
    return f'X-Matrix origin="{origin}",destination="{SERVER_NAME}",key="{KEY_ID}",sig="{signature}"'


def transaction(origin, pdus, tag):
    """A transaction shaped like Synapse's, `pdus` room messages."""
    return {"origin": origin, "origin_server_ts": int(time.time() * 1000), "pdus": [
        {"type": "m.room.message", "room_id": f"!room{tag}:{origin}", "sender": f"@user{i}:{origin}",
         "content": {"msgtype": "m.text", "body": f"message {i} of {tag}: " + "lorem ipsum " * 8},
         "depth": 100 + i, "origin_server_ts": 1_767_225_600_000 + i, "prev_events": [f"$prev{i}"],
         "auth_events": ["$create", "$power", "$member"], "hashes": {"sha256": "a" * 43},
         "signatures": {origin: {KEY_ID: "b" * 86}}} for i in range(pdus)], "edus": []}


def edge_config(work, name, port, upstream, mode, key_port, pki):
    gate = ""
    if mode != "off":
        gate = f"""federation:
  verify:
    mode: {mode}
    ca_file: "{pki['ca']}"
    connect_to: ["localhost:{key_port}:127.0.0.1:{key_port}"]
"""
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""server_name: {SERVER_NAME}
listeners:
  - {{ address: "127.0.0.1:{port}", tls: false, serves: [federation] }}
synapse:
  main: "127.0.0.1:{upstream}"
process: {{ threads: 1 }}
{gate}""")
    return path


def start_edge(work, name, port, upstream, mode, key_port, pki):
    config = edge_config(work, name, port, upstream, mode, key_port, pki)
    log = open(os.path.join(work, f"{name}.log"), "w")
    process = subprocess.Popen([EDGE, "-c", config], stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    wait_port(port)
    return process


def start_nginx(work, name, conf):
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"worker_processes 1; daemon off; pid {work}/{name}.pid; error_log {work}/{name}.err;\n"
                f"events {{ worker_connections 4096; }}\nhttp {{ access_log off; client_max_body_size 10m;\n{conf}\n}}\n")
    return subprocess.Popen(["nginx", "-c", path, "-p", work], stderr=subprocess.DEVNULL)


def nginx_worker(master):
    """The worker process of an nginx master (the one that does the work)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == master.pid:
                            return int(pid)
                except OSError:
                    pass
        time.sleep(0.1)
    sys.exit("nginx started no worker")


def h2load(port, target, header, body_file=None):
    command = ["h2load", "--h1", "-n", str(REQUESTS), "-c", "16", "-t", "1", "-H", f"Authorization: {header}",
               "-H", "Content-Type: application/json"]
    if body_file:
        command += ["-d", body_file]
    out = subprocess.run(command + [f"http://127.0.0.1:{port}{target}"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("status codes:"):
            ok = int(line.split()[2])
            if ok != REQUESTS:
                sys.exit(f"only {ok} of {REQUESTS} answered 2xx through {port} {target}:\n{out}")
            return
    sys.exit(f"h2load failed:\n{out}")


def cost(work, pki, origin_key, key_port):
    stub_port = free_port()
    stub = start_nginx(work, "stub", f"server {{ listen 127.0.0.1:{stub_port}; location / {{ return 200 '{{}}'; }} }}")
    nginx_port = free_port()
    nginx = start_nginx(work, "proxy", f"""upstream synapse {{ server 127.0.0.1:{stub_port}; keepalive 64; }}
server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://synapse; proxy_http_version 1.1;
  proxy_set_header Connection ""; proxy_set_header Host $host; }} }}""")
    edges = {}
    for mode in ("off", "enforce"):
        port = free_port()
        edges[mode] = (start_edge(work, f"edge-{mode}", port, stub_port, mode, key_port, pki), port)
    wait_port(stub_port)
    wait_port(nginx_port)
    proxies = {"matrix-edge, gate off": (edges["off"][0].pid, edges["off"][1]),
               "matrix-edge, enforce": (edges["enforce"][0].pid, edges["enforce"][1]),
               "nginx": (nginx_worker(nginx), nginx_port)}
    origin = f"localhost:{key_port}"
    small = f"/_matrix/federation/v1/query/profile?user_id=%40alice%3A{SERVER_NAME}&field=displayname"
    content = transaction(origin, 50, "cost")
    body_file = os.path.join(work, "txn.json")
    with open(body_file, "wb") as f:
        f.write(json.dumps(content).encode())
    send = "/_matrix/federation/v1/send/cost1"
    workloads = {
        "small GET": (small, authorization(origin_key, origin, "GET", small), None),
        f"50-PDU transaction ({os.path.getsize(body_file) // 1024} KiB)":
            (send, authorization(origin_key, origin, "POST", send, content), body_file),
    }
    # Warm up: the enforcing edge fetches the origin's keys once.
    for name, (pid, port) in proxies.items():
        for target, header, body in workloads.values():
            subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: {header}",
                            "-H", "Content-Type: application/json"] + (["--data-binary", f"@{body}"] if body else [])
                           + [f"http://127.0.0.1:{port}{target}"], check=True)
    samples = {(w, p): [] for w in workloads for p in proxies}
    for round_number in range(ROUNDS):
        order = list(proxies.items())
        if round_number % 2:
            order.reverse()
        for workload, (target, header, body) in workloads.items():
            for name, (pid, port) in order:
                before = cpu_seconds(pid)
                h2load(port, target, header, body)
                samples[(workload, name)].append((cpu_seconds(pid) - before) / REQUESTS * 1e6)
    for process in [stub, nginx] + [edge for edge, _ in edges.values()]:
        process.terminate()
        process.wait()
    return {key: sorted(values)[len(values) // 2] for key, values in samples.items()}, list(workloads)


def synapse(work, pki):
    """A real Synapse (the test virtualenv's) named SERVER_NAME that trusts the bench CA."""
    directory = os.path.join(work, "synapse")
    port = free_port()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/synapse_dev.py"), "config", directory, "--port",
                    str(port), "--server-name", SERVER_NAME, "--public-baseurl", "https://bench.local/"],
                   check=True, stdout=subprocess.DEVNULL)
    config = os.path.join(directory, "homeserver.yaml")
    with open(config, "a") as f:
        f.write(f'ip_range_whitelist: ["127.0.0.0/8"]\nfederation_custom_ca_list: ["{pki["ca"]}"]\n')
    subprocess.run([PYTHON, "-m", "synapse.app.homeserver", "--generate-keys", "-c", config], check=True,
                   stdout=subprocess.DEVNULL)
    process = subprocess.Popen([PYTHON, "-m", "synapse.app.homeserver", "-c", config], stdout=subprocess.DEVNULL,
                               stderr=open(os.path.join(directory, "stderr.log"), "w"))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return process, port
        except OSError:
            time.sleep(0.3)
    sys.exit("Synapse did not start")


def read_more(sock, buffer):
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed")
    return buffer + chunk


def read_response(sock, buffer):
    """Reads one HTTP/1.1 response (Content-Length or chunked); returns
    (status, whether the server closes, rest of buffer)."""
    while b"\r\n\r\n" not in buffer:
        buffer = read_more(sock, buffer)
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding") == b"chunked":
        while b"0\r\n\r\n" not in buffer:
            buffer = read_more(sock, buffer)
        buffer = buffer.split(b"0\r\n\r\n", 1)[1]
    else:
        length = int(headers.get(b"content-length", b"0"))
        while len(buffer) < length:
            buffer = read_more(sock, buffer)
        buffer = buffer[length:]
    return int(head.split()[1]), headers.get(b"connection") == b"close", buffer


def flood(port, origin, count, connections=8):
    """`count` forged transactions on keep-alive connections; returns (statuses, seconds)."""
    forger = Ed25519PrivateKey.generate()
    statuses = {}
    lock = threading.Lock()
    next_id = iter(range(count))

    def one_connection():
        sock = socket.create_connection(("127.0.0.1", port))
        buffer = b""
        while True:
            with lock:
                number = next(next_id, None)
            if number is None:
                break
            target = f"/_matrix/federation/v1/send/forged{number}-{time.time_ns()}"
            content = transaction(origin, 50, number)
            body = json.dumps(content).encode()
            header = authorization(forger, origin, "PUT", target, content)
            request = (f"PUT {target} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nAuthorization: {header}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            for attempt in range(3):
                try:
                    sock.sendall(request)
                    status, closes, buffer = read_response(sock, buffer)
                    break
                except (ConnectionError, OSError):
                    sock.close()
                    sock, buffer, status, closes = socket.create_connection(("127.0.0.1", port)), b"", "lost", False
            if closes:
                sock.close()
                sock, buffer = socket.create_connection(("127.0.0.1", port)), b""
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        sock.close()

    started = time.time()
    threads = [threading.Thread(target=one_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, time.time() - started


def forged_flood(work, pki, key_port):
    process, synapse_port = synapse(work, pki)
    origin = f"localhost:{key_port}"
    results = {}
    try:
        for mode in ("off", "enforce"):
            port = free_port()
            edge = start_edge(work, f"flood-{mode}", port, synapse_port, mode, key_port, pki)
            flood(port, origin, 20)  # Synapse (and the gate) fetch the origin's keys
            time.sleep(2)
            synapse_before, edge_before = cpu_seconds(process.pid), cpu_seconds(edge.pid)
            statuses, seconds = flood(port, origin, FLOOD)
            results[mode] = {"synapse": cpu_seconds(process.pid) - synapse_before,
                             "edge": cpu_seconds(edge.pid) - edge_before, "seconds": seconds, "statuses": statuses}
            edge.terminate()
            edge.wait()
    finally:
        process.terminate()
        process.wait()
    return results


def main():
    for tool in ("nginx", "h2load", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run bench/federation")
    if not os.path.exists(PYTHON):
        sys.exit("Synapse's virtualenv is missing: run scripts/install-deps")
    work = tempfile.mkdtemp(prefix="matrix-edge-federation-bench-")
    pki = write_pki(work)
    origin_key = Ed25519PrivateKey.generate()
    key_port = free_port()
    server = KeyServer(key_port, pki, origin_key)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    medians, workloads = cost(work, pki, origin_key, key_port)
    print(f"### Verification cost (CPU µs per request, {REQUESTS} requests, median of {ROUNDS} rounds)\n")
    print("| request | matrix-edge, gate off | matrix-edge, enforce | verification | nginx (no verification) "
          "| enforce / nginx |")
    print("|---|---|---|---|---|---|")
    for workload in workloads:
        off, on, nginx = (medians[(workload, p)] for p in ("matrix-edge, gate off", "matrix-edge, enforce", "nginx"))
        print(f"| {workload} | {off:.1f} | {on:.1f} | {on - off:+.1f} | {nginx:.1f} | {on / nginx:.2f} |")

    results = forged_flood(work, pki, key_port)
    print(f"\n### {FLOOD} forged 50-PDU transactions on 8 connections, through the edge to a real Synapse\n")
    print("| gate | answers | seconds | Synapse CPU, s | Synapse CPU per request, ms | edge CPU, s |")
    print("|---|---|---|---|---|---|")
    for mode, result in results.items():
        answers = ", ".join(f"{count}× {status}" for status, count in sorted(result["statuses"].items(), key=str))
        print(f"| {mode} | {answers} | {result['seconds']:.1f} | {result['synapse']:.2f} | "
              f"{result['synapse'] / FLOOD * 1000:.2f} | {result['edge']:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
