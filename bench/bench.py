#!/usr/bin/env python3
"""Side-by-side benchmark: matrix-edge, nginx and HAProxy routing Synapse's
worker table to the same stub upstreams, plus no proxy at all.

Run through bench/run (it installs the tools and builds matrix-edge). Every
proxy gets one worker thread/process, the same TLS certificate, keep-alive to
the upstreams and no access log, and the workloads rotate between proxies
round by round so machine noise hits all alike. CPU time is read from
/proc/<pid>/stat for every process of a proxy (utime + stime) over a fixed
request count.
"""
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("BENCH_QUICK") == "1"
# A/B mode: BENCH_AB=path[,path...] runs this build ("A") against those
# binaries ("B0", "B1", ...) and nginx, prints ratios and writes no RESULTS.md.
AB = os.environ.get("BENCH_AB")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 1 if QUICK else 3))
REQUESTS = 20_000 if QUICK else 200_000
# Paired CPU runs: short runs alternating between the proxies, repeated, so
# that the machine's drift (several tens of % on a shared host) hits each
# pair alike; the ratio per pair is the steadiest CPU comparison we have.
PAIRED = int(os.environ.get("BENCH_PAIRED", 4 if QUICK else 12))
PAIRED_REQUESTS = 20_000
# Latency only: BENCH_LATENCY=1 runs the two fixed-rate latency workloads
# (alone, and beside the long-polls) in BENCH_ROUNDS interleaved rounds and
# nothing else, and prints each round's p99 per proxy: enough rounds to tell
# a tail difference from the machine's noise.
LATENCY_ONLY = os.environ.get("BENCH_LATENCY") == "1"


def raise_fd_limit():
    try:  # root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Raised before anything reads it: the idle-connection count depends on it.
raise_fd_limit()
FD_HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# HAProxy reserves two descriptors per connection up front; stay under the
# machine's hard limit (10,000 where it allows).
IDLE_CONNECTIONS = 1_000 if QUICK else min(10_000, (FD_HARD_LIMIT - 1_000) // 2)
BIG = (64 if QUICK else 1024) * 1024 * 1024
LONG_POLLS = 100 if QUICK else 400
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "synapse.example.com"

# The worker groups the stub upstreams stand in for, one port each.
GROUPS = ["main", "synchrotron", "client_reader", "event_creator", "federation_reader", "federation_inbound",
          "media_repository", "sso", "typing", "to_device", "account_data", "presence", "push_rules", "receipts",
          "device_lists", "user_directory", "quarantined_media_changes", "thread_subscriptions", "initial_sync"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    """The process and all its descendants (nginx master + workers)."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.extend(children(int(child)))
    except OSError:
        pass
    return sorted(set(out))


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on {port}")



class Setup:
    def __init__(self, work):
        self.work = work
        self.certs = os.path.join(work, "certs")
        run([os.path.join(ROOT, "scripts/dev-certs"), self.certs, HOST])
        self.cert = os.path.join(self.certs, HOST, "fullchain.pem")
        self.key = os.path.join(self.certs, HOST, "privkey.pem")
        with open(os.path.join(self.certs, "both.pem"), "w") as f:
            f.write(open(self.cert).read() + open(self.key).read())
        self.upstream_ports = {g: free_port() for g in GROUPS}
        self.big = os.path.join(work, "big.bin")
        with open(self.big, "wb") as f:
            f.truncate(BIG)
        self.rules = self.route_rules()
        self.paths = self.request_paths()
        self.processes = []

    def route_rules(self):
        """(pattern, group) in matrix-edge's evaluation order, from `matrix-edge routes`."""
        config = self.edge_config(free_port(), free_port(), write=False)
        path = os.path.join(self.work, "routes.yaml")
        with open(path, "w") as f:
            f.write(config)
        out = run([os.path.join(ROOT, "target/release/matrix-edge"), "routes", "-c", path]).stdout
        rules = []
        for line in out.splitlines()[1:]:
            parts = line.split()
            # Rules that do not apply here ("(skipped: no mas)") route nothing.
            if len(parts) >= 4 and parts[2].startswith("^") and not parts[3].startswith("("):
                rules.append((parts[1], parts[2], parts[3]))
        return rules

    def request_paths(self):
        paths = []
        with open(os.path.join(ROOT, "tests/routing/requests.txt")) as f:
            for line in f:
                if line.startswith("#") or " => " not in line:
                    continue
                method, target = line.split(" => ")[0].split(" | ")[0].split(" ", 1)
                if method == "GET" and not target.startswith("/_synapse/admin"):
                    paths.append(target)
        return paths

    # A sink that reads whole request bodies, for the upload workload, on the
    # port of a group no GET workload reaches (quarantined_media_changes).
    def start_sink(self):
        port = self.upstream_ports["quarantined_media_changes"]
        code = f"""
import http.server
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_any(self):
        if "longpoll=1" in self.path:  # a /sync long-poll: hold it like Synapse would, then answer
            import time, urllib.parse
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            time.sleep(int(query.get("timeout", ["1000"])[0]) / 1000)
        length = self.headers.get("Content-Length")
        if length is not None:
            left = int(length)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk: break
                left -= len(chunk)
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2) if size else self.rfile.readline()
                if not size: break
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{{}}")
    do_GET = do_PUT = do_POST = handle_any
class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, *a): pass  # long-poll clients hang up mid-wait at the end of a run
Quiet(("127.0.0.1", {port}), Sink).serve_forever()
"""
        process = subprocess.Popen([sys.executable, "-c", code])
        self.processes.append(process)
        wait_port(port)

    # Upstream stubs: one nginx answering small JSON on every group port;
    # /sync with longpoll=1 is held by the Python sink for its `timeout`.
    def start_stub(self):
        sink = self.upstream_ports["quarantined_media_changes"]
        longpoll = f"""
    location /_matrix/client/v3/sync {{ error_page 418 = @longpoll; if ($arg_longpoll) {{ return 418; }}
      default_type application/json; return 200 '{{"group":"synchrotron"}}'; }}
    location @longpoll {{ proxy_pass http://127.0.0.1:{sink}; }}"""
        servers = "\n".join(
            f"""  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ default_type application/json; return 200 '{{"group":"{group}"}}'; }}
    location ~ /big$ {{ root {self.work}; try_files /big.bin =404; }}{longpoll if group == "synchrotron" else ""}
  }}""" for group, port in self.upstream_ports.items() if group != "quarantined_media_changes")
        conf = f"""worker_processes 1; daemon off; pid {self.work}/stub.pid; error_log {self.work}/stub.err;
events {{ worker_connections 20000; }}
http {{ access_log off; {servers} }}
"""
        return self.start_nginx("stub", conf, [self.upstream_ports["main"]])

    def start_nginx(self, name, conf, ports):
        path = os.path.join(self.work, f"{name}.conf")
        with open(path, "w") as f:
            f.write(conf)
        process = subprocess.Popen(["nginx", "-c", path, "-p", self.work, "-e", f"{self.work}/{name}.err"],
                                   preexec_fn=raise_fd_limit, stderr=subprocess.DEVNULL)
        self.processes.append(process)
        for port in ports:
            wait_port(port)
        return process

    def edge_config(self, plain, tls, write=True):
        u = self.upstream_ports
        workers = "\n".join(f"    {g}: [127.0.0.1:{u[g]}]" for g in
                            ["synchrotron", "initial_sync", "client_reader", "event_creator", "federation_reader",
                             "federation_inbound", "media_repository", "user_directory"])
        writers = "\n".join(f"    {g}: 127.0.0.1:{u[g]}" for g in
                            ["typing", "to_device", "account_data", "presence", "push_rules", "receipts",
                             "device_lists", "quarantined_media_changes", "thread_subscriptions"])
        return f"""server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{plain}", serves: [client, federation] }}
  - {{ address: "127.0.0.1:{tls}", tls: true, serves: [client, federation] }}
tls:
  certificates: [{{ cert: "{self.cert}", key: "{self.key}" }}]
synapse:
  main: 127.0.0.1:{u['main']}
  workers:
    sso: 127.0.0.1:{u['sso']}
{workers}
  stream_writers:
{writers}
  health_check: {{ interval: 60s }}
# One client address opens every connection here, so no per-address cap.
limits: {{ max_upload_size: 2G, federation_max_body: 2G, connections_per_ip: 0 }}
admin_api: {{ allow: [127.0.0.0/8] }}
process: {{ threads: 1, access_log: off, log_level: warn }}
"""

    def start_edge(self, plain, tls, binary=None, tag="edge"):
        path = os.path.join(self.work, f"{tag}.yaml")
        with open(path, "w") as f:
            f.write(self.edge_config(plain, tls))
        binary = binary or os.path.join(ROOT, "target/release/matrix-edge")
        process = subprocess.Popen([binary, "-c", path,
                                    "--pid-file", f"{self.work}/{tag}.pid", "--upgrade-socket", f"{self.work}/{tag}.sock"],
                                   preexec_fn=raise_fd_limit, stderr=open(f"{self.work}/{tag}.err", "w"))
        self.processes.append(process)
        wait_port(plain)
        wait_port(tls)
        return process

    def start_nginx_proxy(self, plain, tls):
        return self.start_nginx("nginx", self.nginx_proxy_config(plain, tls), [plain, tls])

    def nginx_proxy_config(self, plain, tls):
        u = self.upstream_ports
        upstreams = "\n".join(f"  upstream {g} {{ server 127.0.0.1:{p}; keepalive 64; }}" for g, p in u.items())
        seen, locations = set(), []
        for methods, pattern, group in self.rules:
            if pattern in seen:  # nginx locations are not method-aware; keep the first
                continue
            seen.add(pattern)
            locations.append(f'    location ~ "{pattern}" {{ proxy_pass http://{group}; }}')
        body = "\n".join(locations)
        common = f"""proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto $scheme;
    proxy_buffering off; proxy_request_buffering off; client_max_body_size 2G; keepalive_requests 1000000;
{body}
    location /_matrix {{ proxy_pass http://main; }}
    location /_synapse/client {{ proxy_pass http://main; }}"""
        conf = f"""worker_processes 1; daemon off; pid {self.work}/nginx.pid; worker_rlimit_nofile {FD_HARD_LIMIT};
events {{ worker_connections 20000; }}
http {{
  access_log off;
{upstreams}
  server {{ listen 127.0.0.1:{plain};
    {common}
  }}
  server {{ listen 127.0.0.1:{tls} ssl http2; ssl_certificate {self.cert}; ssl_certificate_key {self.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    {common}
  }}
}}
"""
        return conf

    def start_haproxy(self, plain, tls):
        u = self.upstream_ports
        backends = "\n".join(f"backend {g}\n  server s 127.0.0.1:{p}\n  http-reuse always" for g, p in u.items())
        rules = "\n".join(f"{pattern} {group}" for _, pattern, group in self.rules)
        with open(os.path.join(self.work, "routes.map"), "w") as f:
            f.write(rules + "\n")
        conf = f"""global
  nbthread 1
  maxconn {(FD_HARD_LIMIT - 100) // 2}
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  option http-keep-alive
  option forwardfor
frontend plain
  bind 127.0.0.1:{plain}
  use_backend %[path,map_reg({self.work}/routes.map,main)]
frontend tls
  bind 127.0.0.1:{tls} ssl crt {self.certs}/both.pem alpn h2,http/1.1
  use_backend %[path,map_reg({self.work}/routes.map,main)]
{backends}
"""
        path = os.path.join(self.work, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(conf)
        process = subprocess.Popen(["haproxy", "-f", path], preexec_fn=raise_fd_limit,
                                   stderr=open(f"{self.work}/haproxy.err", "w"))
        self.processes.append(process)
        wait_port(plain)
        wait_port(tls)
        return process

    def stop(self):
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def proxy_command(setup, proxy, plain, tls, tag):
    """The command line that runs `proxy` ("nginx" or a matrix-edge binary)
    alone in the foreground on the bench's routes, its config written under `tag`."""
    if proxy == "nginx":
        conf = os.path.join(setup.work, f"nginx-{tag}.conf")
        with open(conf, "w") as f:
            f.write(setup.nginx_proxy_config(plain, tls))
        return ["nginx", "-c", conf, "-p", setup.work, "-g", "master_process off;"]
    config = os.path.join(setup.work, f"edge-{tag}.yaml")
    with open(config, "w") as f:
        f.write(setup.edge_config(plain, tls))
    return [proxy, "-c", config, "--pid-file", f"{setup.work}/{tag}.pid", "--upgrade-socket", f"{setup.work}/{tag}.sock"]


def h2load(args, urls):
    out = run(["h2load"] + args + urls).stdout
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).group(2))
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    return done, rps, out


def percentiles(log_file):
    durations = []
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                durations.append(int(parts[2]) / 1000.0)  # µs -> ms
    durations.sort()
    if not durations:
        return float("nan"), float("nan")
    pick = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))]
    return pick(0.50), pick(0.99)


def idle_connections(port, count):
    """Opens `count` keep-alive connections, one request each, and keeps them."""
    raise_fd_limit()
    sockets = []
    request = f"GET /_matrix/client/versions HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        sockets.append(s)
    for s in sockets:
        s.settimeout(10)
        s.recv(4096)
    return sockets


def curl(args):
    start = time.time()
    run(["curl", "-sS", "-o", "/dev/null", "--insecure"] + args)
    return time.time() - start


def cpu_per_request(pids, kind, plain, tls, paths, n):
    """CPU µs per request of `pids` over n small GETs: h1 keep-alive plaintext or TLS h2."""
    if kind == "h1":
        urls, args = [f"http://127.0.0.1:{plain}{p}" for p in paths], ["--h1", "-c", "32", "-t", "1"]
    else:
        urls, args = [f"https://127.0.0.1:{tls}{p}" for p in paths], ["-c", "32", "-m", "10", "-t", "1"]
    cpu0 = cpu_seconds(pids)
    done, rps, _ = h2load(["-n", str(n)] + args, urls)
    cpu1 = cpu_seconds(pids)
    return (cpu1 - cpu0) / max(done, 1) * 1e6, rps


def paired_cpu(setup, proxies, ports):
    """PAIRED rounds of short h1 and h2 runs through every proxy in turn
    (order reversed every other round). Returns {kind: {name: [µs, ...]}}."""
    names = list(proxies)
    result = {kind: {name: [] for name in names} for kind in ("h1", "h2")}
    for index in range(PAIRED):
        print(f"paired CPU round {index + 1}/{PAIRED}", flush=True)
        for kind in ("h1", "h2"):
            for name in names if index % 2 == 0 else names[::-1]:
                plain, tls = ports[name]
                us, _ = cpu_per_request(children(proxies[name].pid), kind, plain, tls, setup.paths, PAIRED_REQUESTS)
                result[kind][name].append(us)
    return result


def paired_ratio(paired, kind, name, base):
    """Median over rounds of name's CPU per request divided by base's in the same round."""
    pairs = zip(paired[kind][name], paired[kind][base])
    return median([a / b for a, b in pairs if b > 0])


def measure(setup, name, pids, plain, tls):
    """Every workload against one proxy (or the stub itself for 'none')."""
    if LATENCY_ONLY:
        return measure_latency(setup, name, plain)
    result = {}
    proc_pids = lambda: children(pids[0]) if pids else []
    # Small GETs over the route table, HTTP/1.1 keep-alive, plaintext.
    result["h1_cpu_us"], result["h1_rps"] = cpu_per_request(proc_pids(), "h1", plain, tls, setup.paths, REQUESTS)
    # The same over TLS with HTTP/2.
    if tls:
        result["h2_cpu_us"], result["h2_rps"] = cpu_per_request(proc_pids(), "h2", plain, tls, setup.paths, REQUESTS)
        # New TLS connections: one request per connection.
        n = 500 if QUICK else 2000
        cpu0 = cpu_seconds(proc_pids())
        start = time.time()
        done, _, _ = h2load(["--h1", "-n", str(n), "-c", str(n), "-t", "1"], [f"https://127.0.0.1:{tls}/_matrix/client/versions"])
        elapsed = time.time() - start
        cpu1 = cpu_seconds(proc_pids())
        result["tls_conn_per_s"] = done / elapsed
        result["tls_conn_cpu_us"] = (cpu1 - cpu0) / max(done, 1) * 1e6
    # Latency at a fixed rate (20 clients x 100 req/s), alone and beside long-polls.
    result.update(measure_latency(setup, name, plain))
    # Memory: idle, then with many idle keep-alive connections.
    result["rss_idle_mib"] = rss_kib(proc_pids()) / 1024
    held = idle_connections(plain, IDLE_CONNECTIONS)
    # Idle means settled: long enough for matrix-edge's allocator to purge
    # what opening them freed (jemalloc's 1 s decay). Every proxy waits alike.
    time.sleep(6)
    result["rss_idle_conns_mib"] = rss_kib(proc_pids()) / 1024
    for s in held:
        s.close()
    time.sleep(0.5)
    # Streaming a big body each way; peak RSS growth sampled while it runs.
    for direction in () if AB else ("download", "upload"):
        base = rss_kib(proc_pids())
        media, sink = setup.upstream_ports["media_repository"], setup.upstream_ports["quarantined_media_changes"]
        if direction == "download":
            url = f"http://127.0.0.1:{plain}/_matrix/media/r0/download/big" if pids else f"http://127.0.0.1:{media}/big"
            args = [url]
        else:
            url = f"http://127.0.0.1:{plain}/_synapse/admin/v1/quarantine_media/upload" if pids else f"http://127.0.0.1:{sink}/upload"
            args = ["-T", setup.big, url]
        peak = base
        process = subprocess.Popen(["curl", "-sS", "-f", "-o", "/dev/null", "--insecure", "-w", "%{size_download} %{size_upload}"] + args,
                                   stdout=subprocess.PIPE, text=True)
        start = time.time()
        while process.poll() is None:
            peak = max(peak, rss_kib(proc_pids()))
            time.sleep(0.02)
        elapsed = time.time() - start
        moved = [int(float(x)) for x in process.stdout.read().split()]
        if process.returncode != 0 or max(moved) != BIG:
            raise SystemExit(f"bench: {direction} through {name} moved {moved} bytes, expected {BIG}")
        result[f"{direction}_s"] = elapsed
        result[f"{direction}_rss_growth_mib"] = (peak - base) / 1024
    if not pids:
        # No proxy process: nothing to charge CPU or memory to ("-", not 0).
        for key in [k for k in result if k.endswith(("_cpu_us", "_mib"))]:
            result[key] = float("nan")
    return result


def measure_latency(setup, name, plain):
    """The fixed-rate latency load alone for 10 s, then while LONG_POLLS
    clients hold /sync long-polls of 2 s each (re-issued as each returns),
    as Synapse's clients do."""
    result = {}
    urls_h1 = [f"http://127.0.0.1:{plain}{p}" for p in setup.paths]
    duration = 5 if QUICK else 10
    log = os.path.join(setup.work, f"latency-{name}.log")
    h2load(["--h1", "-c", "20", "-t", "1", "--rps", "100", "-D", str(duration), "--log-file", log], urls_h1)
    result["p50_ms"], result["p99_ms"] = percentiles(log)
    lp_port = setup.upstream_ports["synchrotron"] if name == "none" else plain
    lp_url = f"http://127.0.0.1:{lp_port}/_matrix/client/v3/sync?since=s1&timeout=2000&longpoll=1"
    polls = subprocess.Popen(["h2load", "--h1", "-c", str(LONG_POLLS), "-t", "1", "-D", str(duration + 3), lp_url],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    log = os.path.join(setup.work, f"mix-{name}.log")
    h2load(["--h1", "-c", "20", "-t", "1", "--rps", "100", "-D", str(duration), "--log-file", log], urls_h1)
    result["mix_p50_ms"], result["mix_p99_ms"] = percentiles(log)
    out, _ = polls.communicate()
    succeeded = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    result["longpolls_done"] = int(succeeded.group(1)) if succeeded else 0
    return result


def report_latency(rounds):
    names = [n for n in rounds if n != "none" and rounds[n]]
    for key in ("p99_ms", "mix_p99_ms", "p50_ms", "mix_p50_ms"):
        print(f"{key}: " + "; ".join(f"{n} median {median([r[key] for r in rounds[n]]):.2f} "
                                      f"rounds {[round(r[key], 2) for r in rounds[n]]}" for n in names))
        base = rounds["matrix-edge"]
        for other in names[1:]:
            below = sum(1 for a, b in zip(base, rounds[other]) if a[key] < b[key])
            print(f"  matrix-edge below {other} in {below} of {len(base)} rounds")


def main():
    if not shutil.which("h2load"):
        raise SystemExit("bench: run it through bench/run, which installs h2load, nginx and haproxy")
    raise_fd_limit()
    work = tempfile.mkdtemp(prefix="matrix-edge-bench-")
    os.chmod(work, 0o755)  # nginx workers drop to an unprivileged user
    setup = Setup(work)
    try:
        setup.start_stub()
        setup.start_sink()
        proxies = {}
        variants = AB.split(",") if AB else []
        # HAProxy stays in a latency-only A/B run: its tail is the other yardstick.
        with_haproxy = not AB or LATENCY_ONLY
        names = ["matrix-edge"] + [f"B{i}" for i in range(len(variants))] + ["nginx"] + (["haproxy"] if with_haproxy else [])
        ports = {name: (free_port(), free_port()) for name in names}
        proxies["matrix-edge"] = setup.start_edge(*ports["matrix-edge"])
        for i, binary in enumerate(variants):
            proxies[f"B{i}"] = setup.start_edge(*ports[f"B{i}"], binary=binary, tag=f"edge-b{i}")
        proxies["nginx"] = setup.start_nginx_proxy(*ports["nginx"])
        if with_haproxy:
            proxies["haproxy"] = setup.start_haproxy(*ports["haproxy"])
        time.sleep(1)
        # Memory before any traffic: later idle figures include what a
        # proxy keeps from earlier rounds.
        at_start = {name: rss_kib(children(p.pid)) / 1024 for name, p in proxies.items()}
        rounds = {name: [] for name in list(proxies) + ["none"]}
        for round_index in range(ROUNDS):
            order = list(proxies) if round_index % 2 == 0 else list(reversed(list(proxies)))
            for name in order:
                print(f"round {round_index + 1}/{ROUNDS}: {name}", flush=True)
                plain, tls = ports[name]
                rounds[name].append(measure(setup, name, [proxies[name].pid], plain, tls))
            if not AB:
                print(f"round {round_index + 1}/{ROUNDS}: no proxy", flush=True)
                rounds["none"].append(measure(setup, "none", [], setup.upstream_ports["main"], None))
        for name, mib in at_start.items():
            for r in rounds[name]:
                r["rss_start_mib"] = mib
        if LATENCY_ONLY:
            report_latency(rounds)
            setup.stop()
            return
        paired = paired_cpu(setup, proxies, ports)
        if AB:
            report_ab(rounds, paired)
        else:
            report(setup, rounds, paired)
    except BaseException:
        print(f"bench: failed; configs and error logs are kept in {work}", file=sys.stderr)
        setup.stop()
        raise
    setup.stop()
    shutil.rmtree(work, ignore_errors=True)


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def versions():
    out = {}
    out["matrix-edge"] = run([os.path.join(ROOT, "target/release/matrix-edge"), "--version"]).stdout.strip()
    out["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    out["haproxy"] = run(["haproxy", "-v"]).stdout.splitlines()[0]
    out["h2load"] = run(["h2load", "--version"]).stdout.strip()
    out["rustc"] = run(["rustc", "--version"]).stdout.strip()
    return out


def report_ab(rounds, paired):
    """A (this build) against each B (BENCH_AB, comma-separated) and nginx: medians, ratios, h1 rounds."""
    keys = ["h1_cpu_us", "h2_cpu_us", "h1_rps", "h2_rps", "tls_conn_cpu_us", "p50_ms", "p99_ms", "mix_p99_ms",
            "rss_start_mib", "rss_idle_mib", "rss_idle_conns_mib"]
    names = [n for n in rounds if n not in ("none",)]
    print("| figure | " + " | ".join(names) + " | " + " | ".join(f"{n}/A" for n in names[1:]) + " |")
    for key in keys:
        values = [median([r.get(key, float("nan")) for r in rounds[name]]) for name in names]
        print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " | "
              + " | ".join(f"{v / values[0]:.2f}" for v in values[1:]) + " |")
    for name in names:
        print(name, "h1/h2 cpu rounds:", [(round(r["h1_cpu_us"], 1), round(r.get("h2_cpu_us", 0), 1)) for r in rounds[name]])
    for kind in ("h1", "h2"):
        print(f"paired {kind} CPU ({PAIRED} rounds of {PAIRED_REQUESTS}): "
              + ", ".join(f"{name} {median(paired[kind][name]):.1f} µs ({paired_ratio(paired, kind, name, 'matrix-edge'):.3f}x A)"
                          for name in names))


# RESULTS.md is written by the run above this line; what follows it in the
# file (reading notes, profiles, the optimisation log) is kept across runs.
ANALYSIS_MARKER = "<!-- Written by hand below; bench/run keeps it. -->"


def report(setup, rounds, paired):
    keys = [("h1_cpu_us", "CPU µs/request, h1 plaintext"), ("h2_cpu_us", "CPU µs/request, TLS h2"),
            ("h1_rps", "throughput req/s, h1 (1 thread)"), ("h2_rps", "throughput req/s, TLS h2 (1 thread)"),
            ("tls_conn_per_s", "new TLS connections/s"), ("tls_conn_cpu_us", "CPU µs per new TLS connection"),
            ("p50_ms", "p50 ms at 2000 req/s"), ("p99_ms", "p99 ms at 2000 req/s"),
            ("mix_p50_ms", f"p50 ms at 2000 req/s beside {LONG_POLLS} /sync long-polls"),
            ("mix_p99_ms", f"p99 ms at 2000 req/s beside {LONG_POLLS} /sync long-polls"),
            ("longpolls_done", "long-polls completed (2 s each)"),
            ("rss_start_mib", "RSS at start, MiB"),
            ("rss_idle_mib", "RSS idle between workloads, MiB"), ("rss_idle_conns_mib", f"RSS with {IDLE_CONNECTIONS} idle connections, MiB"),
            ("download_s", f"{BIG >> 20} MiB download, s"), ("download_rss_growth_mib", "RSS growth during download, MiB"),
            ("upload_s", f"{BIG >> 20} MiB upload, s"), ("upload_rss_growth_mib", "RSS growth during upload, MiB")]
    names = ["matrix-edge", "nginx", "haproxy", "none"]
    table = {name: {k: median([r.get(k, float("nan")) for r in rounds[name]]) for k, _ in keys} for name in names}
    lines = ["| figure | matrix-edge | nginx | haproxy | no proxy | matrix-edge / nginx |", "|---|---|---|---|---|---|"]
    for key, label in keys:
        cells = []
        for name in names:
            value = table[name][key]
            cells.append("-" if value != value else f"{value:.2f}" if value < 100 else f"{value:.0f}")
        nginx = table["nginx"][key]
        ratio = table["matrix-edge"][key] / nginx if nginx and nginx == nginx else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |" if ratio == ratio else f"| {label} | " + " | ".join(cells) + " | - |")
    for kind, label in (("h1", "h1 plaintext"), ("h2", "TLS h2")):
        cells = [f"{median(paired[kind][name]):.2f}" if name in paired[kind] else "-" for name in names]
        lines.append(f"| CPU µs/request, {label}, paired short runs | " + " | ".join(cells)
                     + f" | {paired_ratio(paired, kind, 'matrix-edge', 'nginx'):.2f} |")
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    v = versions()
    text = f"""# Benchmark results

Generated by `bench/run` ({'quick' if QUICK else 'full'} run, {ROUNDS} interleaved rounds, medians).
Machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}.
Versions: {v['matrix-edge']}; {v['nginx']}; {v['haproxy']}; {v['h2load']}; {v['rustc']}.

Each proxy runs one worker (nginx `worker_processes 1`, HAProxy `nbthread 1`,
matrix-edge `process.threads: 1` per listener), routes with Synapse's
worker table ({len(setup.rules)} rules; nginx as one regex `location` per
rule in order, HAProxy as a `map_reg` file), keeps upstream connections
alive, logs no requests and serves the same certificate. The upstreams are
one nginx answering a small JSON body on {len(GROUPS)} ports. "No proxy"
sends the same load straight to the stub.

{chr(10).join(lines)}

Commands (URIs: the {len(setup.paths)} GET lines of tests/routing/requests.txt):

- h1: `h2load --h1 -n {REQUESTS} -c 32 -t 1 URI...`
- TLS h2: `h2load -n {REQUESTS} -c 32 -m 10 -t 1 URI...`
- new TLS connections: `h2load --h1 -n N -c N -t 1 https://…/_matrix/client/versions`
- latency: `h2load --h1 -c 20 -t 1 --rps 100 -D 10 --log-file F URI...` (percentiles from F)
- long-poll mix: the latency load while `h2load --h1 -c {LONG_POLLS} -t 1 -D 13 …/sync?since=s1&timeout=2000&longpoll=1` runs (the stub holds each for 2 s)
- idle connections: {IDLE_CONNECTIONS} sockets, one request each, held open
- big bodies: `curl -o /dev/null` of a {BIG >> 20} MiB body, and `curl -T` of the same, RSS sampled every 20 ms

CPU is utime + stime of every process of the proxy over the workload
divided by the requests completed. The "paired short runs" rows repeat
{PAIRED} rounds of {PAIRED_REQUESTS} requests through each proxy in turn (order
reversed every other round); their ratio is the median of the per-round
ratios, which cancels most of the drift a shared machine adds between
workloads minutes apart.
"""
    print(text)
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    kept = ""
    try:
        with open(path) as f:
            previous = f.read()
        if ANALYSIS_MARKER in previous:
            kept = previous.split(ANALYSIS_MARKER, 1)[1]
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text + "\n" + ANALYSIS_MARKER + kept)


if __name__ == "__main__":
    main()
