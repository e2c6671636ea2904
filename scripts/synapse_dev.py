#!/usr/bin/env python3
"""Synapse for development and tests, configured to sit behind matrix-edge.

  synapse_dev.py config DIR --port P --server-name NAME --public-baseurl URL
      Writes a single-process config (SQLite, plain HTTP on 127.0.0.1,
      x_forwarded) to DIR/homeserver.yaml. With --mas URL --mas-secret S,
      logins are delegated to the Matrix Authentication Service at URL
      (Synapse's `matrix_authentication_service`; registration and password
      login off, as Synapse requires then).

  synapse_dev.py workers DIR --server-name NAME --public-baseurl URL
      Starts PostgreSQL and Redis on free loopback ports, then Synapse's main
      process and workers (two synchrotrons, a client reader, an event
      creator, a federation inbound worker, a media repository and a typing
      writer), waits until each answers /health, prints one JSON line with
      their addresses and log files, and stops everything when its stdin
      closes or it receives SIGTERM.

Synapse must be importable by the Python running this script (with the
`postgres` and `redis` extras for `workers`).
"""
import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

GENEROUS = "{per_second: 1000, burst_count: 1000}"

# (worker name, group in matrix-edge's config, listener resources, stream writer)
WORKERS = [
    ("synchrotron1", "synchrotron", ["client", "federation"], None),
    ("synchrotron2", "synchrotron", ["client", "federation"], None),
    ("client_reader1", "client_reader", ["client", "federation"], None),
    ("event_creator1", "event_creator", ["client", "federation"], None),
    ("federation_inbound1", "federation_inbound", ["client", "federation"], None),
    ("media1", "media_repository", ["media", "client", "federation"], None),
    ("typing1", "typing", ["client", "federation"], "typing"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_config(path: str, logfile: str) -> None:
    with open(path, "w") as f:
        f.write(textwrap.dedent(
            f"""\
            version: 1
            formatters:
              precise:
                format: "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
            handlers:
              file:
                class: logging.FileHandler
                formatter: precise
                filename: "{logfile}"
                filters: [context]
            filters:
              context:
                (): synapse.logging.context.LoggingContextFilter
                request: ""
            loggers:
              synapse.access.http:
                level: INFO
            root:
              level: INFO
              handlers: [file]
            disable_existing_loggers: false
            """))


def write_config(base, port, server_name, public_baseurl, max_upload_size="50M", database=None, extra="", mas=None):
    """The main process's config; `database` is YAML for the database section;
    `mas` is (endpoint, shared secret) to delegate authentication to MAS."""
    base = os.path.abspath(base)
    os.makedirs(os.path.join(base, "media"), exist_ok=True)
    if database is None:
        database = f'{{name: sqlite3, args: {{database: "{base}/homeserver.db"}}}}'
    config = textwrap.dedent(
        f"""\
        server_name: "{server_name}"
        public_baseurl: "{public_baseurl}"
        pid_file: "{base}/homeserver.pid"
        listeners:
          - port: {port}
            bind_addresses: ["127.0.0.1"]
            type: http
            tls: false
            x_forwarded: true
            request_id_header: X-Request-ID
            resources:
              - names: [client, federation, media]
                compress: false
        database: {database}
        log_config: "{base}/log.yaml"
        media_store_path: "{base}/media"
        signing_key_path: "{base}/signing.key"
        max_upload_size: {max_upload_size}
        report_stats: false
        registration_shared_secret: "{secrets.token_hex(16)}"
        macaroon_secret_key: "{secrets.token_hex(16)}"
        form_secret: "{secrets.token_hex(16)}"
        enable_registration: {"false" if mas else "true"}
        enable_registration_without_verification: true
        trusted_key_servers: []
        suppress_key_server_warning: true
        url_preview_enabled: false
        presence:
          enabled: false
        rc_message: {GENEROUS}
        rc_registration: {GENEROUS}
        rc_joins: {{local: {GENEROUS}, remote: {GENEROUS}}}
        rc_login:
          address: {GENEROUS}
          account: {GENEROUS}
          failed_attempts: {GENEROUS}
        """) + extra
    if mas:
        endpoint, secret = mas
        config += textwrap.dedent(
            f"""\
            matrix_authentication_service:
              enabled: true
              endpoint: "{endpoint}"
              secret: "{secret}"
            password_config:
              enabled: false
            """)
    path = os.path.join(base, "homeserver.yaml")
    with open(path, "w") as f:
        f.write(config)
    log_config(os.path.join(base, "log.yaml"), os.path.join(base, "homeserver.log"))
    return path


def cmd_config(args) -> None:
    mas = (args.mas, args.mas_secret) if args.mas else None
    print(write_config(args.dir, args.port, args.server_name, args.public_baseurl, args.max_upload_size, mas=mas))


def as_postgres(command):
    """PostgreSQL refuses to run as root; run it as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + command
    return command


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        sys.exit(f"synapse_dev: {name} not found (install Debian's postgresql package)")
    return found


def wait_health(port: int, process, name: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"synapse_dev: {name} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"synapse_dev: {name} did not answer /health on {port}")


def cmd_workers(args) -> None:
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    processes = []

    def stop(*_):
        for p in reversed(processes):
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)

    # PostgreSQL, with the C collation Synapse requires.
    pgdata = os.path.join(base, "pgdata")
    os.makedirs(pgdata, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(pgdata, "postgres")
    pg_port = free_port()
    subprocess.run(as_postgres([postgres_bin("initdb"), "-D", pgdata, "-U", "synapse", "--auth=trust",
                                "-E", "UTF8", "--locale=C"]), check=True, stdout=subprocess.DEVNULL)
    processes.append(subprocess.Popen(as_postgres([postgres_bin("postgres"), "-D", pgdata, "-p", str(pg_port),
                                                   "-k", pgdata, "-c", "listen_addresses=127.0.0.1"]),
                                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(base, "postgres.log"), "w")))
    redis_port = free_port()
    processes.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", pg_port), timeout=1).close()
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("synapse_dev: PostgreSQL or Redis did not start")
            time.sleep(0.2)

    main_port, main_replication = free_port(), free_port()
    ports = {name: free_port() for name, *_ in WORKERS}
    replication = {name: free_port() for name, _, _, writer in WORKERS if writer}
    instance_map = {"main": {"host": "127.0.0.1", "port": main_replication}}
    instance_map.update({name: {"host": "127.0.0.1", "port": port} for name, port in replication.items()})
    writers = {}
    for name, _, _, writer in WORKERS:
        if writer:
            writers.setdefault(writer, []).append(name)
    media_worker = next(name for name, group, *_ in WORKERS if group == "media_repository")
    extra = textwrap.dedent(
        f"""\
        redis: {{enabled: true, host: 127.0.0.1, port: {redis_port}}}
        instance_map: {json.dumps(instance_map)}
        stream_writers: {json.dumps(writers)}
        enable_media_repo: false
        media_instance_running_background_jobs: {media_worker}
        """)
    database = (f"{{name: psycopg2, args: {{user: synapse, host: 127.0.0.1, port: {pg_port}, "
                f"database: postgres, cp_min: 1, cp_max: 5}}}}")
    config = write_config(os.path.join(base, "main"), main_port, args.server_name, args.public_baseurl,
                          database=database, extra=extra)
    # The main process also listens for replication.
    text = open(config).read().replace(
        "listeners:\n",
        "listeners:\n"
        f"  - {{port: {main_replication}, bind_addresses: ['127.0.0.1'], type: http, "
        "resources: [{names: [replication]}]}\n", 1)
    with open(config, "w") as f:
        f.write(text)
    python = sys.executable
    subprocess.run([python, "-m", "synapse.app.homeserver", "-c", config, "--generate-keys"], check=True,
                   stdout=subprocess.DEVNULL)
    # name -> (command, stderr file, port): what `restart NAME` on stdin runs again.
    launches = {"main": ([python, "-m", "synapse.app.homeserver", "-c", config],
                         os.path.join(base, "main", "stderr.log"), main_port)}
    running = {}

    def launch(name):
        command, stderr, _ = launches[name]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(stderr, "a"))
        processes.append(process)
        running[name] = process
        return process

    main = launch("main")
    wait_health(main_port, main, "main")

    logs = {"main": os.path.join(base, "main", "homeserver.log")}
    started = []
    for name, group, resources, _ in WORKERS:
        listeners = [{"type": "http", "port": ports[name], "bind_addresses": ["127.0.0.1"], "x_forwarded": True,
                      "request_id_header": "X-Request-ID", "resources": [{"names": resources}]}]
        if name in replication:
            listeners.append({"type": "http", "port": replication[name], "bind_addresses": ["127.0.0.1"],
                              "resources": [{"names": ["replication"]}]})
        worker_config = os.path.join(base, f"{name}.yaml")
        logfile = os.path.join(base, f"{name}.log")
        log_config(os.path.join(base, f"{name}.log.yaml"), logfile)
        settings = {"worker_app": "synapse.app.generic_worker", "worker_name": name,
                    "worker_listeners": listeners, "worker_log_config": os.path.join(base, f"{name}.log.yaml")}
        if group == "media_repository":
            # The shared config turns the media repository off for main.
            settings["enable_media_repo"] = True
        with open(worker_config, "w") as f:
            json.dump(settings, f)
        launches[name] = ([python, "-m", "synapse.app.generic_worker", "-c", config, "-c", worker_config],
                          os.path.join(base, f"{name}.stderr"), ports[name])
        process = launch(name)
        started.append((name, process))
        logs[name] = logfile
    for name, process in started:
        wait_health(ports[name], process, name)

    groups = {}
    pids = dict((name, process.pid) for name, process in started)
    for name, group, _, _ in WORKERS:
        groups.setdefault(group, []).append({"name": name, "address": f"127.0.0.1:{ports[name]}",
                                             "pid": pids[name]})
    print(json.dumps({"main": f"127.0.0.1:{main_port}", "groups": groups, "logs": logs,
                      "redis": f"127.0.0.1:{redis_port}"}), flush=True)
    # `restart NAME` on stdin stops that process (SIGTERM, Synapse's own
    # graceful stop), starts it again and answers once it is healthy;
    # end of input stops everything.
    try:
        for line in sys.stdin:
            words = line.split()
            if len(words) != 2 or words[0] != "restart" or words[1] not in launches:
                print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
                continue
            name = words[1]
            old = running[name]
            old.terminate()
            try:
                old.wait(timeout=30)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
            process = launch(name)
            wait_health(launches[name][2], process, name)
            print(json.dumps({"restarted": name, "pid": process.pid}), flush=True)
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config")
    config.add_argument("dir")
    config.add_argument("--port", type=int, required=True)
    config.add_argument("--server-name", required=True)
    config.add_argument("--public-baseurl", required=True)
    config.add_argument("--max-upload-size", default="50M")
    config.add_argument("--mas", help="the Matrix Authentication Service's URL, as Synapse reaches it")
    config.add_argument("--mas-secret", default="")
    workers = sub.add_parser("workers")
    workers.add_argument("dir")
    workers.add_argument("--server-name", required=True)
    workers.add_argument("--public-baseurl", required=True)
    args = parser.parse_args()
    {"config": cmd_config, "workers": cmd_workers}[args.command](args)


if __name__ == "__main__":
    main()
