"""What a real node changes on this machine, recorded before it changes it, and undone exactly.

`snapshot()` runs once, before the first start of a real node, and is saved with the cluster. `down`
then undoes the difference between that record and the machine as it finds it:

- iptables/ip6tables rules and chains that were not there (kube-proxy's KUBE-*, the CNI plugins'
  CNI-*), and nftables tables that iptables-nft created for them;
- sysctls whose value differs from the recorded one (kubelet sets kernel.panic, kernel.panic_on_oops,
  vm.overcommit_memory, ...; the node needs net.ipv4.ip_forward and bridge-nf-call-iptables);
- folders outside the cluster's own that kubelet, containerd and the CNI plugins create where they
  hardcode a path (/var/lib/kubelet/device-plugins, /var/log/containers, /run/containerd, /var/lib/cni);

and, independent of the record: every mount under the cluster's folder, the cluster's bridge and the
veths on it, and the cluster's cgroup subtree (deepest first, after killing what is left in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

Progress = Callable[[str], None]

SYSCTLS: tuple[str, ...] = (
    # needed by the node: pods' traffic is routed and crosses a bridge that iptables must see
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    # set by kubelet (protectKernelDefaults: false)
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    # kube-proxy's, left alone by our configuration, recorded in case
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# The node sets these itself before starting anything.
NODE_SYSCTLS: dict[str, str] = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}
# Paths outside the cluster's folder that kubelet, containerd or the CNI plugins write to.
OUTSIDE_PATHS: tuple[str, ...] = (
    "/var/lib/kubelet",
    "/var/lib/kubelet/device-plugins",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/var/lib/cni",
)
IPTABLES_FAMILIES = {"ipv4": ("iptables", "iptables-save"), "ipv6": ("ip6tables", "ip6tables-save")}
SYSCTL_ROOT = Path("/proc/sys")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _run(argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


# -- sysctls ----------------------------------------------------------------------------------------
def read_sysctl(key: str) -> str | None:
    try:
        return (SYSCTL_ROOT / key).read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> None:
    (SYSCTL_ROOT / key).write_text(value + "\n")


# -- iptables ---------------------------------------------------------------------------------------
@dataclass
class Table:
    """One table of `iptables-save` output: its chains, and each chain's rules (as printed)."""

    chains: set[str] = field(default_factory=set)  # user-defined chains (no policy)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, rule spec after `-A CHAIN `)


def parse_iptables_save(text: str) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    current: Table | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), Table())
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            if policy == "-":  # built-in chains (INPUT, POSTROUTING, ...) have a policy and stay
                current.chains.add(name)
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            current.rules.append((chain, spec))
    return tables


def iptables_undo_commands(before: str, now: str, binary: str) -> list[list[str]]:
    """Commands that take the rules `now` back to `before`: delete added rules, then added chains."""
    old, new = parse_iptables_save(before), parse_iptables_save(now)
    commands: list[list[str]] = []
    for name, table in new.items():
        previous = old.get(name, Table())
        added_chains = sorted(table.chains - previous.chains)
        remaining = list(previous.rules)
        for chain, spec in table.rules:
            if chain in added_chains:
                continue  # flushed below
            if (chain, spec) in remaining:
                remaining.remove((chain, spec))
                continue
            commands.append([binary, "-w", "-t", name, "-D", chain, *shlex.split(spec)])
        commands += [[binary, "-w", "-t", name, "-F", chain] for chain in added_chains]
        commands += [[binary, "-w", "-t", name, "-X", chain] for chain in added_chains]
    return commands


def iptables_save(family: str) -> str:
    binary = IPTABLES_FAMILIES[family][1]
    if shutil.which(binary) is None:
        return ""
    return _run([binary]).stdout


def nft_tables() -> list[str]:
    """`family name` of each nftables table (empty without `nft`)."""
    if shutil.which("nft") is None:
        return []
    lines = _run(["nft", "list", "tables"]).stdout.splitlines()
    return sorted(line.removeprefix("table ").strip() for line in lines if line.startswith("table "))


# -- the record -------------------------------------------------------------------------------------
def snapshot() -> dict[str, object]:
    """The machine's state that a real node may change, to be saved before it changes anything."""
    return {
        "sysctls": {key: value for key in SYSCTLS if (value := read_sysctl(key)) is not None},
        "iptables": {family: iptables_save(family) for family in IPTABLES_FAMILIES},
        "nft_tables": nft_tables(),
        "existing_paths": [p for p in OUTSIDE_PATHS if os.path.lexists(p)],
    }


def save(record: dict[str, object], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def load(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- network ----------------------------------------------------------------------------------------
def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def ensure_bridge(name: str, address_cidr: str) -> None:
    """Create the bridge with its gateway address, up, unless it exists (idempotent)."""
    if not link_exists(name):
        _run(["ip", "link", "add", "name", name, "type", "bridge"], check=True)
    have = _run(["ip", "-o", "-4", "addr", "show", "dev", name]).stdout
    if f" {address_cidr} " not in have:
        _run(["ip", "addr", "add", address_cidr, "dev", name], check=True)
    _run(["ip", "link", "set", name, "up"], check=True)


def bridge_ports(name: str) -> list[str]:
    folder = Path("/sys/class/net", name, "brif")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def remove_bridge(name: str) -> list[str]:
    """Delete the veths on the bridge and the bridge; returns what failed."""
    failed = []
    for port in bridge_ports(name):
        result = _run(["ip", "link", "delete", port])
        if result.returncode != 0 and link_exists(port):
            failed.append(f"ip link delete {port}: {result.stderr.strip()}")
    if link_exists(name):
        result = _run(["ip", "link", "delete", name])
        if result.returncode != 0:
            failed.append(f"ip link delete {name}: {result.stderr.strip()}")
    return failed


ROUTE_TYPES = {
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "anycast",
    "unreachable",
    "blackhole",
    "prohibit",
    "throw",
}


def used_networks() -> list[str]:
    """IPv4 networks of this machine's addresses and routes (a pod subnet must overlap none)."""
    found = []
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        words = line.split()
        if "inet" in words[:-1]:
            found.append(words[words.index("inet") + 1])
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        words = line.split()
        if words and words[0] in ROUTE_TYPES:
            words = words[1:]
        if words and words[0] != "default":
            found.append(words[0])
    return found


# -- mounts -----------------------------------------------------------------------------------------
def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(prefixes: Iterable[Path], mountinfo: str | None = None) -> list[str]:
    """Mount points at or below any of `prefixes`, deepest first."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    roots = [str(p).rstrip("/") for p in prefixes]
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        point = _unescape(parts[4])
        if any(point == root or point.startswith(root + "/") for root in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)


def unmount_all(prefixes: Iterable[Path]) -> list[str]:
    """Unmount everything under `prefixes` (stacked mounts too); returns what could not be."""
    prefixes = list(prefixes)
    for _ in range(5):
        points = mounts_under(prefixes)
        if not points:
            return []
        for point in points:
            if _run(["umount", point]).returncode != 0:
                _run(["umount", "-l", point])
    return [f"still mounted: {point}" for point in mounts_under(prefixes)]


# -- cgroups ----------------------------------------------------------------------------------------
def cgroup_hierarchies(mountinfo: str | None = None) -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    found = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            found.append(Path(_unescape(left.split()[4])))
    return sorted(set(found))


def ensure_cgroup(relative: str) -> None:
    """Create `relative` (e.g. /tandem-x) in every hierarchy: kubelet requires its cgroupRoot to exist."""
    for hierarchy in cgroup_hierarchies():
        folder = hierarchy / relative.lstrip("/")
        folder.mkdir(exist_ok=True)
        # A new cpuset cgroup starts with no CPUs and no memory nodes: no task could join it.
        for name in ("cpuset.cpus", "cpuset.mems"):
            with contextlib.suppress(OSError):
                if (folder / name).exists() and not (folder / name).read_text().strip():
                    (folder / name).write_text((hierarchy / name).read_text())


def cgroup_dirs(relative: str) -> list[Path]:
    """Every cgroup folder at or below `relative`, in every hierarchy, deepest first."""
    found = []
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / relative.lstrip("/")
        if top.is_dir():
            found += [Path(root) for root, _dirs, _files in os.walk(top)]
    return sorted(found, key=lambda p: (len(p.parts), str(p)), reverse=True)


def cgroup_pids(relative: str) -> set[int]:
    pids = set()
    for folder in cgroup_dirs(relative):
        with contextlib.suppress(OSError, ValueError):
            pids |= {int(x) for x in (folder / "cgroup.procs").read_text().split()}
    return pids


def kill_cgroup(relative: str, wait: float = 10.0) -> list[str]:
    """SIGKILL every process left in the subtree (the pods' containers); returns pids that stayed."""
    deadline = time.monotonic() + wait
    while pids := cgroup_pids(relative):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return [f"process {pid} in cgroup {relative} survived SIGKILL" for pid in sorted(pids)]
        time.sleep(0.1)
    return []


def remove_cgroup(relative: str) -> list[str]:
    """rmdir the subtree deepest first in every hierarchy; returns what could not be removed."""
    failed = []
    for folder in cgroup_dirs(relative):
        for attempt in range(20):
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if attempt == 19:
                    failed.append(f"rmdir {folder}: {error.strerror}")
                time.sleep(0.05)  # a just-killed process may still be leaving it
    return failed


# -- undo -------------------------------------------------------------------------------------------
def restore_firewall(record: dict[str, object]) -> list[str]:
    failed = []
    before = record.get("iptables", {})
    assert isinstance(before, dict)
    for family, (binary, _save) in IPTABLES_FAMILIES.items():
        if shutil.which(binary) is None:
            continue
        for command in iptables_undo_commands(str(before.get(family, "")), iptables_save(family), binary):
            result = _run(command)
            if result.returncode != 0:
                failed.append(f"{shlex.join(command)}: {result.stderr.strip()}")
    tables_before = set(record.get("nft_tables", []) or [])  # type: ignore[call-overload]
    for table in nft_tables():
        if table not in tables_before:
            family, _, name = table.partition(" ")
            result = _run(["nft", "delete", "table", family, name])
            if result.returncode != 0:
                failed.append(f"nft delete table {table}: {result.stderr.strip()}")
    return failed


def restore_sysctls(record: dict[str, object]) -> list[str]:
    failed = []
    recorded = record.get("sysctls", {})
    assert isinstance(recorded, dict)
    for key, value in recorded.items():
        current = read_sysctl(key)
        if current is not None and current != value:
            try:
                write_sysctl(key, str(value))
            except OSError as error:
                failed.append(f"sysctl {key}={value}: {error.strerror}")
    return failed


def remove_outside_paths(record: dict[str, object], own: Callable[[Path], bool]) -> list[str]:
    """Remove outside folders that did not exist before; in ones that did, only entries `own` claims."""
    existing = set(record.get("existing_paths", []) or [])  # type: ignore[call-overload]
    failed = []
    # Deepest first, so a folder we created inside one that existed is handled on its own.
    for name in sorted(OUTSIDE_PATHS, key=lambda p: p.count("/"), reverse=True):
        path = Path(name)
        if not path.exists():
            continue
        try:
            if name not in existing and not any(p.startswith(name + "/") for p in existing):
                shutil.rmtree(path)
                continue
            for entry in list(path.iterdir()) if path.is_dir() else []:
                if own(entry):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        except OSError as error:
            failed.append(f"removing {path}: {error}")
    return failed
