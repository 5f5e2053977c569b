"""`edm_opt.localrun`: single-node ranks whose every listening socket is on 127.0.0.1, that stop together."""

import json
import os
import subprocess
import sys
import time

LAUNCH = [sys.executable, "-m", "edm_opt.localrun"]

RANK = r'''
import json, os, socket, sys, time, torch
from edm_opt import distributed as D

def listening(pid):
    """host:port of every TCP socket process `pid` listens on (/proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table, fam in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                host, port = f[1].split(":")
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                out.append([socket.inet_ntop(fam, raw), int(port, 16)])
    return out

env = D.read_env("cpu")
D.init(env, 60)
if sys.argv[1] == "fail" and env.rank == 1:
    sys.exit(3)
if sys.argv[1] == "hang":
    with open(os.path.join(sys.argv[2], f"pid-{env.rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(f.name, f.name[:-4])
    time.sleep(600)
t = torch.ones(1)
D.all_reduce_sum(env, t)
mine = listening(os.getpid()) + (listening(os.getppid()) if env.rank == 0 else [])
D.barrier(env)
with open(os.path.join(sys.argv[2], f"rank-{env.rank}.json"), "w") as f:  # a file each: stdout lines interleave
    json.dump({"rank": env.rank, "world": env.world_size, "sum": t.item(), "listen": mine}, f)
D.barrier(env)
'''


def script(tmp_path):
    p = tmp_path / "rank.py"
    p.write_text(RANK)
    return str(p)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_ranks_reduce_and_listen_on_loopback_only(tmp_path):
    out = subprocess.run(LAUNCH + ["--nproc_per_node=3", script(tmp_path), "ok", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=env())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")), key=lambda d: d["rank"])
    assert [d["rank"] for d in lines] == [0, 1, 2]
    assert all(d["world"] == 3 and d["sum"] == 3.0 for d in lines)
    addresses = [a for d in lines for a, _ in d["listen"]]
    assert addresses and set(addresses) == {"127.0.0.1"}, addresses  # the store, gloo: never a wildcard
    assert len(lines[0]["listen"]) >= 2  # rank 0 hosts the store beside its gloo listener; the launcher none


def test_a_failing_rank_stops_the_others_with_its_exit_code(tmp_path):
    t0 = time.time()
    out = subprocess.run(LAUNCH + ["--nproc_per_node", "2", script(tmp_path), "fail", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 3, out.stderr[-3000:]
    assert time.time() - t0 < 100  # rank 0 was stopped, not left to its 60 s collective timeout


def test_ranks_die_with_a_killed_launcher(tmp_path):
    p = subprocess.Popen(LAUNCH + ["--nproc_per_node=2", script(tmp_path), "hang", str(tmp_path)], env=env())
    files = [tmp_path / f"pid-{r}" for r in range(2)]
    deadline = time.time() + 60
    while not all(f.exists() for f in files) and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(f.read_text()) for f in files]
    p.kill()  # SIGKILL: nothing of the launcher runs, the ranks get their parent-death signal
    p.wait()
    deadline = time.time() + 5
    alive = pids
    while alive and time.time() < deadline:
        alive = [q for q in pids if os.path.exists(f"/proc/{q}") and
                 open(f"/proc/{q}/stat").read().split(")")[1].split()[0] != "Z"]
        time.sleep(0.1)
    assert not alive, f"ranks {alive} outlived their launcher"


def test_bad_usage_is_one_message():
    for args, needle in ((["--nproc_per_node=0", "x.py"], "positive integer"), ([], "no command"),
                         (["--nodes=2", "x.py"], "unknown option --nodes")):
        p = subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
