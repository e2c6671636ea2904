#!/usr/bin/env python3
"""Memory of one matrix-edge build, on its own: a fresh process behind a tiny
asyncio upstream.
  request / connect: N plaintext keep-alive connections with one request
    each (or none), RSS before and after: the cost of an idle connection.
  tls-burst: three bursts of N simultaneous new TLS connections (h2load, one
    request each), RSS after each once they are gone: what a burst leaves.
SETTLE (seconds, default 6: past the allocator's 1 s purge delay) is the wait
before each reading.
  python3 bench/idle-memory.py [BINARY] [N] [request|connect|tls-burst]"""
import asyncio, os, resource, socket, subprocess, sys, tempfile, time, threading
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/matrix-edge")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
mode = sys.argv[3] if len(sys.argv) > 3 else "request"
work = tempfile.mkdtemp(prefix="matrix-edge-idle-")
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
up, edge = free(), free()
async def handle(r, w):
    try:
        while True:
            line = await r.readline()
            if not line: return
            while (await r.readline()) not in (b"\r\n", b""): pass
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"); await w.drain()
    except Exception: pass
def serve():
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", up); await srv.serve_forever()
    asyncio.run(main())
threading.Thread(target=serve, daemon=True).start()
tls = mode == "tls-burst"
if tls:
    subprocess.run([os.path.join(ROOT, "scripts/dev-certs"), f"{work}/certs", "localhost"], check=True)
certs = f"{work}/certs/localhost"
cfg = f"""server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{edge}", tls: {str(tls).lower()}, serves: [client] }}
{f'tls: {{ certificates: [{{ cert: "{certs}/fullchain.pem", key: "{certs}/privkey.pem" }}] }}' if tls else ''}
synapse:
  main: "127.0.0.1:{up}"
limits: {{ connections_per_ip: 0 }}
process: {{ threads: 1, access_log: off, log_level: warn }}
"""
open(f"{work}/c.yaml", "w").write(cfg)
p = subprocess.Popen([binary, "-c", f"{work}/c.yaml", "--pid-file", f"{work}/pid", "--upgrade-socket", f"{work}/sock"],
                     stderr=open(f"{work}/err", "w"))
time.sleep(1.0)
def rss(): return int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0].split()[1])
settle = float(os.environ.get("SETTLE", "6"))
if tls:
    r0 = rss(); after = []
    for _ in range(3):
        subprocess.run(["h2load", "--h1", "-n", str(n), "-c", str(n), "-t", "1",
                        f"https://127.0.0.1:{edge}/_matrix/client/versions"], capture_output=True, check=True)
        time.sleep(settle); after.append(rss())
    print(f"{os.path.basename(binary)} tls-burst: fresh {r0/1024:.1f} MiB, after bursts of {n}: "
          + ", ".join(f"{r/1024:.1f}" for r in after) + " MiB")
    socks = []
else:
    # warm up
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", edge)); s.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"); s.recv(4096); s.close()
    time.sleep(0.3); r0 = rss()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", edge))
        if mode == "request": s.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    if mode == "request":
        for s in socks: s.settimeout(10); s.recv(4096)
    time.sleep(settle); r1 = rss()
    print(f"{os.path.basename(binary)} {mode}: base {r0/1024:.1f} MiB, with {n} idle {r1/1024:.1f} MiB, per conn {(r1-r0)/n:.1f} KiB")
for s in socks: s.close()
p.terminate(); p.wait()
import shutil; shutil.rmtree(work, ignore_errors=True)
