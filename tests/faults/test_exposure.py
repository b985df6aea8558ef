"""A local Ray that vidopt starts listens on loopback only, and its auth token file is readable by its owner alone.

Sockets are read from /proc (Linux): every listening TCP socket of this process and its descendants (GCS, raylet,
agents, monitor, workers) must be bound to 127.0.0.1 or ::1.
"""
import ipaddress
import os
import stat
import sys
from pathlib import Path

import pytest
import ray

from vidopt.config import RayConfig
from workers.pools import AUTH_TOKEN_FILE, connect, private_auth_token

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")

TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp*


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp* writes an address as 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_ip)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _listening_by_inode() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                hex_ip, hex_port = fields[1].split(":")
                found[int(fields[9])] = (_address(hex_ip), int(hex_port, 16))
    return found


def _process_tree(root: int) -> dict[int, str]:
    """pid -> name (its command line's first word, e.g. `ray::IDLE`) of `root` and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # the process ended meanwhile
                continue
            parents[int(entry)] = int(stat_line.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    names = {}
    for pid in tree:
        try:
            argv = [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # the process ended meanwhile
            continue
        name = os.path.basename(argv[0].split()[0]) if argv[0].strip() else comm
        if name.startswith("python"):  # name the script too: `python monitor.py`, `python pytest`
            script = "-c" if "-c" in argv else next((arg for arg in argv[1:] if arg and arg[0] != "-"), "")
            name = f"{name} {os.path.basename(script)}".strip()
        names[pid] = name
    return names


def listening_sockets(root: int) -> list[tuple[int, str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(pid, process name, address, port) of each listening TCP socket owned by `root` or a descendant."""
    by_inode = _listening_by_inode()
    found = []
    for pid, name in _process_tree(root).items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in by_inode:
                found.append((pid, name, *by_inode[int(link[8:-1])]))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8, ::1, or 127.0.0.1 seen through an IPv6 socket (::ffff:127.0.0.1)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_local_ray_listens_on_loopback_only_and_its_token_is_private():
    ray.shutdown()  # an earlier test's Ray would hide whether connect() starts a loopback one
    try:
        resources = connect(RayConfig(num_cpus=1))
        worker_pid = ray.get(ray.remote(num_cpus=1)(lambda: os.getpid()).remote())  # a worker exists and listens
        sockets = listening_sockets(os.getpid())

        owners = {name for _, name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= owners, f"no GCS or raylet listener found among {sorted(owners)}"
        assert worker_pid in {pid for pid, _, _, _ in sockets}, "the worker that ran the task has no listener"
        exposed = [f"{name} (pid {pid}) on {address}:{port}" for pid, name, address, port in sockets
                   if not is_loopback(address)]
        assert not exposed, "listening beyond loopback: " + "; ".join(exposed)
        assert ray.util.get_node_ip_address() == "127.0.0.1" and "node:127.0.0.1" in resources

        if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not (
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            assert AUTH_TOKEN_FILE.exists(), f"token authentication on, yet no {AUTH_TOKEN_FILE}"
            mode = stat.S_IMODE(AUTH_TOKEN_FILE.stat().st_mode)
            assert mode == 0o600, f"{AUTH_TOKEN_FILE} has mode {mode:o}, not 600"
    finally:
        ray.shutdown()


def test_auth_token_is_written_owner_only_and_an_existing_one_is_narrowed(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    fresh = tmp_path / "home" / ".ray" / "auth_token"
    private_auth_token(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    assert len(fresh.read_text()) == 64 and int(fresh.read_text(), 16) >= 0

    earlier = tmp_path / "auth_token"
    earlier.write_text("a-token-of-an-earlier-run")
    earlier.chmod(0o644)
    private_auth_token(earlier)
    assert stat.S_IMODE(earlier.stat().st_mode) == 0o600 and earlier.read_text() == "a-token-of-an-earlier-run"

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token in use: no file written
    private_auth_token(tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
