#!/usr/bin/env python3
"""User-space instructions per request under callgrind, for matrix-edge and
nginx on the same route table and stub upstreams as bench.py.

CPU time on a shared machine drifts by tens of percent between runs;
instruction counts do not (repeated runs of one build agree within 0.5 %),
so this is how a small change to the request path is judged before the
interleaved CPU runs of bench.py. Kernel work (syscalls) is not counted:
compare syscalls with `strace -c` if a change could move them.

  python3 bench/instructions.py [h1|h2] [PASSES] [BINARY|nginx ...]
  (default: h1, 1 pass, target/release/matrix-edge and nginx)

Each of h2load's 32 clients walks the URI list from its start, so the
request count is 32 x URIs x PASSES: every URI equally often. (A count that
stops part-way through the list weighs the early routes more, which moves
nginx's figure by a third: it walks its regex locations in order.)

Needs valgrind (Debian: apt-get install valgrind) and what bench/run installs.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py's stub upstreams and proxy configs)

WARMUP = 1000
CLIENTS = 32


def count(setup, index, proxy, kind, n):
    plain, tls = bench.free_port(), bench.free_port()
    out = os.path.join(setup.work, f"callgrind.{index}")
    command = bench.proxy_command(setup, proxy, plain, tls, "cg")
    process = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"] + command,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_port(tls, timeout=60)  # valgrind starts slowly
        if kind == "h1":
            urls, args = [f"http://127.0.0.1:{plain}{p}" for p in setup.paths], ["--h1", "-c", str(CLIENTS), "-t", "1"]
        else:
            urls, args = [f"https://127.0.0.1:{tls}{p}" for p in setup.paths], ["-c", str(CLIENTS), "-m", "10", "-t", "1"]
        bench.h2load(["-n", str(WARMUP)] + args, urls)
        # Count only the measured requests: zero the counters, load, dump.
        bench.run(["callgrind_control", "-z", str(process.pid)])
        done, _, _ = bench.h2load(["-n", str(n)] + args, urls)
        bench.run(["callgrind_control", "-d", str(process.pid)])
        dumps = glob.glob(f"{out}.{process.pid}.*")
        if not dumps or done < n * 0.99:
            raise SystemExit(f"instructions: {proxy}: {done}/{n} requests succeeded, dumps {dumps}")
        with open(dumps[0]) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:")))
        return total / n, dumps[0]
    finally:
        process.terminate()
        process.wait()


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "h1"
    passes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    proxies = sys.argv[3:] or [os.path.join(bench.ROOT, "target/release/matrix-edge"), "nginx"]
    if not shutil.which("valgrind"):
        raise SystemExit("instructions: needs valgrind (apt-get install valgrind)")
    work = tempfile.mkdtemp(prefix="matrix-edge-instructions-")
    os.chmod(work, 0o755)
    setup = bench.Setup(work)
    try:
        setup.start_stub()
        n = CLIENTS * len(setup.paths) * passes
        for index, proxy in enumerate(proxies):
            per_request, dump = count(setup, index, proxy, kind, n)
            print(f"{kind} {proxy}: {per_request:,.0f} instructions per request (user space; profile: callgrind_annotate {dump})")
    finally:
        setup.stop()


if __name__ == "__main__":
    main()
