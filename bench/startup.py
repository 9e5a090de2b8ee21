#!/usr/bin/env python3
"""Time from process start to the first 200 from a health URL, for the emulator and a peer.

Usage: python3 bench/startup.py [path/to/iothub-emulator] [runs]

Each run starts the release binary with ports 0 and a fresh data dir (so the first run includes
generating the CA) or the reused one, polls /health every millisecond until it answers 200, records
the elapsed wall time, and stops the process with SIGTERM. The peer is `python3 -m http.server`
measured the same way, as a floor for "a server process is up and answering".
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def wait_http(url, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.001)
    return False


def time_emulator(binary, data_dir):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "--https-port", "0", "--http-port", "0", "--amqp-port", "0", "--ftp-port", "0",
                          "--mqtt-port", "0",
                          "--data-dir", data_dir],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("IOTHUB_CONNECTION_STRING="):
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"emulator exited after printing {lines}")
            lines.append(line)
        url = next(l for l in lines if l.startswith("http://")).strip() + "/health"
        if not wait_http(url, t0 + 10):
            raise SystemExit(f"emulator never became healthy: {lines}")
        return (time.monotonic() - t0) * 1000
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)


def time_peer(port):
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    try:
        if not wait_http(f"http://127.0.0.1:{port}/", t0 + 10):
            raise SystemExit("peer never answered")
        return (time.monotonic() - t0) * 1000
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)


def summary(name, samples):
    samples = sorted(samples)
    print(f"{name:<42} runs={len(samples):<3} min={samples[0]:7.1f} ms  "
          f"median={statistics.median(samples):7.1f} ms  max={samples[-1]:7.1f} ms")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/iothub-emulator"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    data_dir = tempfile.mkdtemp(prefix="iothub-startup-")
    try:
        first = time_emulator(binary, data_dir)
        warm = [time_emulator(binary, data_dir) for _ in range(runs)]
        cold = []
        for _ in range(max(3, runs // 4)):
            fresh = tempfile.mkdtemp(prefix="iothub-startup-")
            cold.append(time_emulator(binary, fresh))
            shutil.rmtree(fresh, ignore_errors=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    peer = [time_peer(38000 + i) for i in range(runs)]
    print(f"# startup to first 200 from /health ({os.cpu_count()} cores)")
    summary("iothub-emulator, first start (new CA)", [first] + cold)
    summary("iothub-emulator, later starts (CA reused)", warm)
    summary("peer: python3 -m http.server", peer)


if __name__ == "__main__":
    main()
