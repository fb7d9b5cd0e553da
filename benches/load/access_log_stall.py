#!/usr/bin/env python3
"""Memory held by a stalled access log: the gateway logs into a pipe
whose reader never reads, and gets REQUESTS requests whose paths are
PATH_BYTES long. Prints the RSS before and after, and the lines dropped.

Usage: python3 benches/load/access_log_stall.py BINARY [REQUESTS]
         [PATH_BYTES] [ACCESS_LOG_EXTRA]
e.g.   python3 benches/load/access_log_stall.py target/release/tollgate \
         12000 7900 ", queue_bytes: 16MiB"
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

binary = sys.argv[1]
requests = int(sys.argv[2]) if len(sys.argv) > 2 else 12000
path_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 7900
extra = sys.argv[4] if len(sys.argv) > 4 else ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream(listener):
    """Answers every request on a connection with an empty 200."""
    def serve(conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, buf = buf.split(b"\r\n\r\n", 1)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def send_all(port, paths):
    """One keepalive connection, one request at a time."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        for p in paths:
            s.sendall(f"GET {p} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
            status = f.readline()
            length = 0
            while True:
                line = f.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            f.read(length)
            if b" 200 " not in status:
                sys.exit(f"unexpected answer: {status!r}")


def dropped(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config") as r:
        return json.load(r)["access_log_dropped"]


with tempfile.TemporaryDirectory() as d:
    fifo = os.path.join(d, "access.pipe")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    threading.Thread(target=upstream, args=(listener,), daemon=True).start()
    port, admin = free_port(), free_port()
    config = os.path.join(d, "tollgate.yaml")
    with open(config, "w") as f:
        f.write(
            f"server:\n  threads: 2\n  pid_file: {d}/tollgate.pid\n"
            f"  upgrade_sock: {d}/upgrade.sock\n  grace_period_seconds: 0\n"
            f"  graceful_shutdown_timeout_seconds: 1\n"
            f"listen: [\"127.0.0.1:{port}\"]\nadmin: \"127.0.0.1:{admin}\"\n"
            f"access_log: {{ path: \"{fifo}\"{extra} }}\n"
            f"upstreams:\n  app: {{ targets: [\"127.0.0.1:{listener.getsockname()[1]}\"] }}\n"
            f"routes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n"
        )
    gw = subprocess.Popen([binary, "-c", config], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_port(admin)
        # Warm up with short lines (they fill the pipe: the writer stalls).
        send_all(port, [f"/warm/{i}" for i in range(2000)])
        time.sleep(1)
        before = rss_kib(gw.pid)
        long = "a" * path_bytes
        start = time.time()
        send_all(port, [f"/{i}/{long}" for i in range(requests)])
        took = time.time() - start
        time.sleep(1)
        after = rss_kib(gw.pid)
        print(f"{binary}{extra}: {requests} requests of {path_bytes}-byte paths "
              f"in {took:.1f} s; RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
              f"(+{(after - before) / 1024:.1f} MiB); {dropped(admin)} lines dropped")
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
        os.close(reader)
