#!/usr/bin/env python3
"""Checks Moe's TcpStoreClient against a real torch.distributed.TCPStore, on a host with torch installed.

Usage, with bench/TcpStoreCheck bundled by ../shared/tools/gpu-bundle.sh (see bench/gpu/README.md):

    mkdir -p /tmp/gpu && tar -xJf .gpu/TcpStoreCheck.tar.xz -C /tmp/gpu
    python3 .gpu/tcpstore_check.py /tmp/gpu/TcpStoreCheck/run

Cases (each is one line, "ok NAME" or "FAILED NAME: why"; the last line is "tcpstore check: N passed, M failed, K skipped"):
  {libuv,legacy}-{plain,sealed}  a TCPStore(is_master=True) on loopback with that server backend; the .NET side joins
                                 it as a torchrun worker would (/worker/attempt_3), sets a 128-byte blob, adds, times
                                 out a wait, waits for a key Python sets later, and opens a barrier Python entered;
                                 Python reads through PrefixStore what a torch worker would see. "sealed" sets
                                 MOE_RENDEZVOUS_SECRET: the blob must be unreadable and Python's plain value refused.
  torchrun-{standalone,static}-{plain,sealed}
                                 `torchrun --no-python` starts two .NET workers; rank 0 publishes an id through the
                                 agent's store, rank 1 reads it, both pass a barrier.
Exit code 0 when every case passed. Nothing here prints a value or a secret.
"""
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

RESTART = 3
PREFIX = f"/worker/attempt_{RESTART}"
SECRET = "5e" * 32
TIMEOUT = timedelta(seconds=60)


def child_env(secret, **extra):
    env = dict(os.environ, **extra)
    env.pop("MOE_RENDEZVOUS_SECRET", None)
    if secret:
        env["MOE_RENDEZVOUS_SECRET"] = secret
    return env


def last_json(text):
    lines = [line[line.index("{"):] for line in text.splitlines() if "{" in line]
    return [json.loads(line) for line in lines]


class Skip(Exception):
    pass


def store_case(exe, tag, use_libuv, sealed):
    try:
        master = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=use_libuv, wait_for_workers=False, timeout=TIMEOUT)
    except Exception as e:
        if use_libuv:
            raise
        raise Skip(f"this torch has no legacy (non-libuv) TCPStore server: {e}")
    worker = dist.PrefixStore(PREFIX, dist.TCPStore("127.0.0.1", master.port, is_master=False, use_libuv=use_libuv, timeout=TIMEOUT))
    # Python enters the barrier first, so that the .NET side is the one that opens it (sealed, when it has a secret).
    assert worker.add(f"barrier/{tag}/b/arrived", 1) == 1
    env = child_env(SECRET if sealed else None, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master.port),
                    TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(RESTART))
    proc = subprocess.Popen([exe, "check", tag], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker.wait([f"{tag}/from-dotnet"], TIMEOUT)
        blob = worker.get(f"{tag}/from-dotnet")
        expected = bytes(range(128))
        if sealed:
            assert blob[:4] == b"MOES" and len(blob) == 128 + 33, f"not a sealed value: {len(blob)} bytes, starts {blob[:4]!r}"
            assert expected[16:48] not in blob, "the plaintext is readable in the store"
        else:
            assert blob == expected, "the blob differs from what .NET set"
        worker.set(f"{tag}/from-python", b"hello from python")  # after .NET has waited a while on it
        worker.wait([f"barrier/{tag}/b/open", f"{tag}/done"], TIMEOUT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = last_json(out)
    assert results, f"no JSON from the .NET side; stderr: {err[-2000:]}"
    r = results[-1]
    assert proc.returncode == 0, f".NET side exited {proc.returncode}: {json.dumps(r)[:3000]}"
    assert r["add"] == [5, 7], r["add"]
    assert worker.get(f"{tag}/counter") == b"8", worker.get(f"{tag}/counter")
    assert worker.add(f"barrier/{tag}/b/arrived", 0) == 2
    assert r["try_missing"] is False
    assert 600 <= r["timeout_ms"] < 5000, r["timeout_ms"]
    assert f"'{tag}/missing'" in r["timeout_message"] and f"127.0.0.1:{master.port}" in r["timeout_message"], r["timeout_message"]
    if sealed:
        assert "is not sealed" in r["from_python_refused"], r.get("from_python_refused")
    else:
        assert r["from_python"] == "hello from python", r.get("from_python")
    done = worker.get(f"{tag}/done")
    assert done[:4] == b"MOES" if sealed else done == b"ok", f"done is {len(done)} bytes"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_case(exe, rdzv, sealed):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    if rdzv == "standalone":
        launch += ["--standalone"]
    else:
        launch += ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    proc = subprocess.run(launch + ["--no-python", exe, "torchrun"], env=child_env(SECRET if sealed else None),
                          capture_output=True, text=True, timeout=300)
    results = last_json(proc.stdout)
    assert proc.returncode == 0 and len(results) == 2, \
        f"torchrun exited {proc.returncode} with {len(results)} results: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["id_matches"] and r["barrier"] == "passed" and r["sealed"] == sealed for r in results), results


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    exe = sys.argv[1]
    print(f"torch {torch.__version__}")
    kind = lambda sealed: "sealed" if sealed else "plain"
    cases = [(f"{'libuv' if u else 'legacy'}-{kind(s)}", lambda u=u, s=s: store_case(exe, f"{'libuv' if u else 'legacy'}-{kind(s)}", u, s))
             for u in (True, False) for s in (False, True)]
    cases += [(f"torchrun-{r}-{kind(s)}", lambda r=r, s=s: torchrun_case(exe, r, s))
              for r in ("standalone", "static") for s in (False, True)]
    passed = failed = skipped = 0
    for name, run in cases:
        try:
            run()
            print(f"ok {name}", flush=True)
            passed += 1
        except Skip as e:
            print(f"skipped {name}: {e}", flush=True)
            skipped += 1
        except Exception as e:  # report and go on: one line per case
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
            failed += 1
    print(f"tcpstore check: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
