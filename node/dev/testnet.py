"""A network testbed from real kernel parts: each host its own network namespace.

`Testnet(hosts=N, rtt_ms=50, loss=0.01)` builds, as root:

- one *switch* namespace (``mr-<pid>-sw``) holding a Linux bridge;
- N *host* namespaces (``mr-<pid>-h0`` …), each with a veth ``eth0`` on the
  bridge and its own address ``10.77.K.(i+1)/24`` (K is a /24 no route of the
  root namespace uses yet);
- one *management* veth from the root namespace onto the same bridge, address
  ``10.77.K.254/24``. It is how the test process (in the root namespace)
  reaches the nodes' JSON-RPC APIs, which bind their host address. It is the
  only thing added to the root namespace: one interface and the connected
  route of its private /24, both gone when the testbed closes. Management
  traffic is exempt from delay, loss and partitions.

Impairments, all in the kernel's packet path between real kernel TCP stacks:

- **Partitions** (`partition(a, b)` / `heal()`): nftables ``drop`` rules in a
  ``bridge`` family table of the switch namespace, matching source and
  destination addresses both ways. Packets vanish: no FIN, no RST, no ICMP.
- **Loss** (`loss=0.01`): nftables in the same table drops a random fraction of
  the frames between hosts in the kernel (``numgen random mod 1000 < 10 drop``);
  each packet crosses the switch once, so 1 % is 1 % per packet.
- **Delay** (`rtt_ms=50`): this kernel has no ``netem`` qdisc
  (``CONFIG_NET_SCH_NETEM`` is not set) and no ``fq`` qdisc
  (``CONFIG_NET_SCH_FQ`` is not set, so eBPF earliest-departure-time is out as
  well). What it has is the netfilter queue (``CONFIG_NETFILTER_NETLINK_QUEUE``)
  and the xtables ``NFQUEUE`` target (``CONFIG_NETFILTER_XT_TARGET_NFQUEUE``),
  but *not* nftables' own ``queue`` expression (``CONFIG_NFT_QUEUE`` is not
  set: ``nft add rule … queue num 0`` fails with "Could not process rule: No
  such file or directory"). So each host namespace gets one ``iptables`` rule
  (iptables-nft, which reaches the xtables target through nft_compat):
  ``-A INPUT -s <subnet> -j NFQUEUE --queue-num 0``. Every packet a host
  receives from another host is handed to this process over nfnetlink (spoken directly on
  a raw ``AF_NETLINK`` socket, see `_NfQueue`; no C binding needed), held on a
  timer heap for RTT/2 and then given back with ``NF_ACCEPT``: the kernel sends
  the very same packet on. Both directions are delayed, so a round trip takes
  at least the RTT. The delay is applied where packets arrive, not where they
  leave: a packet held in the sender's OUTPUT hook still counts against its
  socket, and with BBR a socket's third small write in a row then waited RTT/2
  for the held one, a stall no real link has (measured: 350 ms vs 190 ms p50
  per job at 50 ms RTT). Verdicts for metadata only (``NFQNL_COPY_META``): the packet
  bytes never leave the kernel. With ``rtt_ms=0`` no packet is queued at all.

  Chosen over a userspace TUN relay (the other mechanism that works here)
  because the packets stay on real veths and a real bridge; only the "when"
  is decided in userspace. The holding thread runs in the process that owns the
  `Testnet`; if it dies the kernel drops queued packets (the queue has no
  bypass), so a testbed never silently loses its delay.

`probe(a, b)` measures the real round trip between two hosts with a UDP echo
(no ``ping`` on this machine): both sockets are opened inside their namespaces
by this process (a socket stays in the namespace it was created in).

Nodes run inside the namespaces through `ip netns exec` (`popen`, `exec`, or
`devstack()`, which places a meshrun devstack's nodes one per host). Names carry
this process's pid, so parallel runs never collide, and leftovers of dead pids
(a run that was SIGKILLed) are removed when the next testbed starts. Cleanup
(children, namespaces, veths, bridge, nft/iptables tables that live in them) runs
in ``__exit__`` and, as a last resort, at interpreter exit.

`available()` returns why the testbed cannot run here (not root, no ``ip``,
``nft`` or ``iptables``, no namespaces, no NFQUEUE), or None.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import heapq
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
NAME_RE = re.compile(r"^mr-(\d+)-(sw|h\d+)$")
ROOT_IF_RE = re.compile(r"^mr(\d+)$")
CLONE_NEWNET = 0x40000000
MGMT_HOST = 254


class TestnetError(RuntimeError):
    pass


class Unreachable(TestnetError):
    """No probe came back: the hosts cannot talk (a partition, or total loss)."""


# ------------------------------------------------------------------ availability


_available_cache: list[str | None] = []


def available() -> str | None:
    """None when a testbed can be built here, else the reason it cannot (for pytest.skip)."""
    if _available_cache:
        return _available_cache[0]
    reason = _check_available()
    _available_cache.append(reason)
    return reason


def _check_available() -> str | None:
    if sys.platform != "linux":
        return "the testbed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, veth, nftables)"
    for tool in ("ip", "nft", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/sysdeps.sh installs it)"
    name = f"mr-{os.getpid()}-hprobe"
    try:
        _run(["ip", "netns", "add", name])
    except TestnetError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "mrprobe"])
        nfqueue = ["-d", "192.0.2.1", "-j", "NFQUEUE", "--queue-num", "0"]
        _run(["ip", "netns", "exec", name, "iptables", "-A", "OUTPUT", *nfqueue])
        queue = _NfQueue.open_in(name)
        queue.close()
    except (TestnetError, OSError) as exc:
        return f"nftables / NFQUEUE do not work here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


# ------------------------------------------------------------------ small helpers


def _run(argv: Sequence[str], input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestnetError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside network namespace `netns` (it stays there for its life).

    setns changes only the calling thread's namespace, so a helper thread enters the
    namespace, creates the socket and ends; this thread never moves.
    """
    result: list[Any] = []

    def work() -> None:
        try:
            with open(NETNS_DIR / netns) as f:
                _setns(f.fileno())
            result.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    t = threading.Thread(target=work, name=f"setns-{netns}")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def remove_stale() -> list[str]:
    """Remove namespaces and root interfaces left by testbeds whose process is gone."""
    removed = []
    for name in _netns_names():
        m = NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(name)
            removed.append(name)
    for ifname in _root_links():
        m = ROOT_IF_RE.match(ifname)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "link", "delete", ifname], check=False)
            removed.append(ifname)
    return removed


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _root_links() -> list[str]:
    out = _run(["ip", "-j", "link", "show"], check=False) or "[]"
    return [link.get("ifname", "") for link in json.loads(out)]


def _kill_netns_processes(name: str) -> None:
    pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _delete_netns(name: str) -> None:
    _kill_netns_processes(name)
    _run(["ip", "netns", "delete", name], check=False)


# ------------------------------------------------------------------ nfnetlink queue

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nfmsg(msg: int, family: int, queue: int, attrs: bytes, flags: int, seq: int) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    return _NLMSGHDR.pack(16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


class _NfQueue:
    """One bound netfilter queue (number 0) in one namespace, on a raw netlink socket."""

    def __init__(self, sock: socket.socket, netns: str) -> None:
        self.sock = sock
        self.netns = netns
        self.seq = itertools.count(1)

    @classmethod
    def open_in(cls, netns: str, queue: int = 0) -> _NfQueue:
        sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            sock.bind((0, 0))
            q = cls(sock, netns)
            q._config(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)), queue)
            q._config(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)), queue)
            q._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", 20_000)), queue)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return q

    def _config(self, attrs: bytes, queue: int) -> None:
        seq = next(self.seq)
        self.sock.send(
            _nfmsg(NFQNL_MSG_CONFIG, socket.AF_INET, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq)
        )
        self.sock.settimeout(2.0)
        data = self.sock.recv(65536)
        _len, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, 16)
            if code != 0:
                raise OSError(-code, f"nfqueue config: {os.strerror(-code)}")

    def packets(self) -> Iterator[tuple[int, int]]:
        """(queue, packet id) of every packet waiting on the socket now."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # messages were lost; carry on
                    continue
                raise
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _f, _s, _p = _NLMSGHDR.unpack_from(data, offset)
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    (queue,) = struct.unpack_from(">H", data, offset + 18)
                    pos, end = offset + 20, offset + length
                    while pos + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, pos)
                        if alen < 4:
                            break
                        if atype & 0x7FFF == NFQA_PACKET_HDR:
                            (packet_id,) = struct.unpack_from(">I", data, pos + 4)
                            yield queue, packet_id
                            break
                        pos += (alen + 3) & ~3
                offset += (length + 3) & ~3

    def accept(self, queue: int, packet_id: int) -> None:
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id))
        msg = _nfmsg(NFQNL_MSG_VERDICT, socket.AF_UNSPEC, queue, attrs, NLM_F_REQUEST, 0)
        with contextlib.suppress(OSError):
            self.sock.send(msg)

    def close(self) -> None:
        self.sock.close()


class _DelayLine(threading.Thread):
    """Holds every queued packet of every host for `delay` seconds, then accepts it."""

    def __init__(self) -> None:
        super().__init__(name="testnet-delay", daemon=True)
        self.delay = 0.0
        self.queues: list[_NfQueue] = []
        self._heap: list[tuple[float, int, _NfQueue, int, int]] = []
        self._count = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        self._halt = False
        self._lock = threading.Lock()
        self.held = 0

    def add(self, q: _NfQueue) -> None:
        with self._lock:
            self.queues.append(q)
        os.write(self._wake_w, b"x")

    def run(self) -> None:
        while not self._halt:
            now = time.monotonic()
            timeout = max(0.0, self._heap[0][0] - now) if self._heap else None
            with self._lock:
                queues = list(self.queues)
            by_fd = {q.sock.fileno(): q for q in queues}
            try:
                ready, _, _ = select.select([self._wake_r, *by_fd], [], [], timeout)
            except (OSError, ValueError):
                continue
            now = time.monotonic()
            for fd in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                q = by_fd[fd]
                with contextlib.suppress(OSError):
                    for queue, packet_id in q.packets():
                        heapq.heappush(
                            self._heap, (now + self.delay, next(self._count), q, queue, packet_id)
                        )
                        self.held += 1
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, q, queue, packet_id = heapq.heappop(self._heap)
                q.accept(queue, packet_id)
        for _, _, q, queue, packet_id in self._heap:
            q.accept(queue, packet_id)
        self._heap.clear()

    def stop(self) -> None:
        self._halt = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.is_alive():
            self.join(5)
        for q in self.queues:
            q.close()
        self.queues = []
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# ------------------------------------------------------------------ the testbed

_live: set[Testnet] = set()


@atexit.register
def _close_all() -> None:
    for net in list(_live):
        net.close()


class Testnet:
    """N hosts, each its own network namespace, on one bridge; see the module docstring."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, hosts: int = 3, rtt_ms: float = 0.0, loss: float = 0.0) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        self.hosts = hosts
        self.rtt_ms = float(rtt_ms)
        self.loss = float(loss)
        self.tag = f"mr-{os.getpid()}"
        self.root_if = f"mr{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.subnet: ipaddress.IPv4Network | None = None
        self.partitions: list[tuple[frozenset[int], frozenset[int]]] = []
        self.children: list[subprocess.Popen[Any]] = []
        self._delay: _DelayLine | None = None
        self._queued = False
        self._created: list[str] = []
        self._lock = threading.Lock()

    # -- names and addresses

    def netns(self, host: int) -> str:
        self._check_host(host)
        return f"{self.tag}-h{host}"

    def addr(self, host: int) -> str:
        self._check_host(host)
        assert self.subnet is not None, "the testnet is not started"
        return str(self.subnet.network_address + host + 1)

    @property
    def mgmt_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + MGMT_HOST)

    def _check_host(self, host: int) -> None:
        if not 0 <= host < self.hosts:
            raise IndexError(f"host {host} is not in 0..{self.hosts - 1}")

    # -- lifecycle

    def __enter__(self) -> Testnet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        reason = available()
        if reason is not None:
            raise TestnetError(reason)
        remove_stale()
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.subnet = self._free_subnet()
        prefix = self.subnet.prefixlen
        sw = self.switch
        _run(["ip", "netns", "add", sw])
        self._created.append(sw)
        batch = [
            "link set lo up",
            "link add br0 type bridge",
            "link set br0 up",
        ]
        _run(["ip", "-n", sw, "-batch", "-"], input="\n".join(batch) + "\n")
        # Bridged frames must not also go through the switch's iptables (br_netfilter).
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            path = f"net.bridge.{key}=0"
            _run(["ip", "netns", "exec", sw, "sysctl", "-qw", path], check=False)
        for i in range(self.hosts):
            ns = self.netns(i)
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(
                [
                    "ip",
                    "-n",
                    sw,
                    "link",
                    "add",
                    f"p{i}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ]
            )
            _run(
                ["ip", "-n", sw, "-batch", "-"],
                input=f"link set p{i} master br0\nlink set p{i} up\n",
            )
            _run(
                ["ip", "-n", ns, "-batch", "-"],
                input=f"link set lo up\naddr add {self.addr(i)}/{prefix} dev eth0\n"
                "link set eth0 up\n",
            )
        # The management port: the root namespace's one way onto the bridge.
        _run(
            ["ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "mgmt", "netns", sw]
        )
        self._created.append(self.root_if)
        _run(["ip", "-n", sw, "-batch", "-"], input="link set mgmt master br0\nlink set mgmt up\n")
        _run(["ip", "addr", "add", f"{self.mgmt_addr}/{prefix}", "dev", self.root_if])
        _run(["ip", "link", "set", self.root_if, "up"])
        self._delay = _DelayLine()
        self._delay.start()
        for i in range(self.hosts):
            self._delay.add(_NfQueue.open_in(self.netns(i)))
        self._apply()

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = _run(["ip", "-4", "route", "show", "table", "all"], check=False)
        start = os.getpid() % 250
        for k in range(250):
            net = ipaddress.IPv4Network(f"10.77.{(start + k) % 250}.0/24")
            if str(net.network_address)[:-1] not in used:
                return net
        raise TestnetError("no free /24 in 10.77.0.0/16")

    def close(self) -> None:
        with self._lock:
            try:
                for child in self.children:
                    with contextlib.suppress(Exception):
                        if child.poll() is None:
                            child.kill()
                        child.wait(5)
                self.children = []
                if self._delay is not None:
                    delay, self._delay = self._delay, None
                    delay.stop()
            finally:
                # Namespaces go whatever happened above: their processes are killed first.
                for name in reversed(self._created):
                    with contextlib.suppress(Exception):
                        if name == self.root_if:
                            _run(["ip", "link", "delete", name], check=False)
                        else:
                            _delete_netns(name)
                self._created = []
                _live.discard(self)

    # -- impairments

    def set_link(self, rtt_ms: float | None = None, loss: float | None = None) -> None:
        """Round-trip delay (ms) and per-packet loss (0..1) between every pair of hosts."""
        if rtt_ms is not None:
            if rtt_ms < 0:
                raise ValueError("rtt_ms must be >= 0")
            self.rtt_ms = float(rtt_ms)
        if loss is not None:
            if not 0 <= loss <= 1:
                raise ValueError("loss must be in [0, 1]")
            self.loss = float(loss)
        self._apply()

    def partition(self, a_hosts: Iterable[int], b_hosts: Iterable[int]) -> None:
        """Silently drop everything between the two sets (no FIN, no RST), both ways."""
        a, b = frozenset(a_hosts), frozenset(b_hosts)
        for h in a | b:
            self._check_host(h)
        if a & b:
            raise ValueError(f"a host cannot be on both sides: {sorted(a & b)}")
        self.partitions.append((a, b))
        self._apply()

    def heal(self) -> None:
        self.partitions = []
        self._apply()

    def _apply(self) -> None:
        assert self.subnet is not None and self._delay is not None
        self._delay.delay = self.rtt_ms / 2000.0
        rules = []
        host_set = "{ " + ", ".join(self.addr(i) for i in range(self.hosts)) + " }"
        for a, b in self.partitions:
            sa = "{ " + ", ".join(self.addr(i) for i in sorted(a)) + " }"
            sb = "{ " + ", ".join(self.addr(i) for i in sorted(b)) + " }"
            rules.append(f"ip saddr {sa} ip daddr {sb} drop")
            rules.append(f"ip saddr {sb} ip daddr {sa} drop")
        per_mille = round(self.loss * 1000)
        if per_mille >= 1000:
            rules.append(f"ip saddr {host_set} ip daddr {host_set} drop")
        elif per_mille > 0:
            rules.append(
                f"ip saddr {host_set} ip daddr {host_set} numgen random mod 1000 < {per_mille} drop"
            )
        body = "\n".join(f"    {r}" for r in rules)
        script = (
            "table bridge meshrun_testnet {}\n"
            "delete table bridge meshrun_testnet\n"
            "table bridge meshrun_testnet {\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"{body}\n"
            "  }\n"
            "}\n"
        )
        _run(["ip", "netns", "exec", self.switch, "nft", "-f", "-"], input=script)
        want_queue = self.rtt_ms > 0
        if want_queue != self._queued:
            op = "-A" if want_queue else "-D"
            queue_rules = [
                ["-i", "lo", "-j", "ACCEPT"],  # a host talking to itself is not delayed
                ["-s", self.mgmt_addr, "-j", "ACCEPT"],  # nor is management traffic
                ["-s", str(self.subnet), "-j", "NFQUEUE", "--queue-num", "0"],
            ]
            for i in range(self.hosts):
                for qrule in queue_rules:
                    _run(["ip", "netns", "exec", self.netns(i), "iptables", op, "INPUT", *qrule])
            self._queued = want_queue

    # -- processes

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def exec(self, host: int, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(host, argv), **kw)

    def popen(self, host: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.command(host, argv), **kw)
        self.children.append(proc)
        return proc

    def devstack(self, data_dir: Path, compute: int | None = None, **kw: Any) -> Any:
        """A meshrun Devstack whose requester runs on host 0 and compute-i on host i."""
        from node.dev.devstack import Devstack

        compute = self.hosts - 1 if compute is None else compute
        if compute + 1 > self.hosts:
            raise ValueError(
                f"{compute + 1} nodes need as many hosts; the testnet has {self.hosts}"
            )
        names = ["requester"] + [f"compute-{i}" for i in range(1, compute + 1)]
        placement = {name: self.placement(i) for i, name in enumerate(names)}
        return Devstack(data_dir, compute=compute, placement=placement, **kw)

    def placement(self, host: int) -> Any:
        """Where a devstack node runs on `host` (for Devstack.spawn placements or .move)."""
        from node.dev.devstack import Placement

        self._check_host(host)
        return Placement(
            prefix=tuple(self.command(host, [])),
            listen=f"/ip4/{self.addr(host)}/tcp/4001",
            rpc_host=self.addr(host),
        )

    def host_of(self, address: str) -> int:
        assert self.subnet is not None
        return int(ipaddress.IPv4Address(address)) - int(self.subnet.network_address) - 1

    # -- measuring

    def probe(self, a: int, b: int, count: int = 5, timeout: float = 1.0) -> float:
        """Median round trip (seconds) of `count` UDP echoes from host a to host b.

        Raises Unreachable when none comes back.
        """
        server = socket_in(self.netns(b), socket.AF_INET, socket.SOCK_DGRAM)
        client = socket_in(self.netns(a), socket.AF_INET, socket.SOCK_DGRAM)
        stop = threading.Event()
        try:
            server.bind((self.addr(b), 0))
            server.settimeout(0.1)
            port = server.getsockname()[1]

            def echo() -> None:
                while not stop.is_set():
                    try:
                        data, peer = server.recvfrom(2048)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    server.sendto(data, peer)

            thread = threading.Thread(target=echo, daemon=True)
            thread.start()
            client.bind((self.addr(a), 0))
            rtts = []
            for n in range(count):
                token = struct.pack(">Qd", n, time.monotonic())
                sent = time.monotonic()
                client.sendto(token, (self.addr(b), port))
                deadline = sent + timeout
                while (left := deadline - time.monotonic()) > 0:
                    client.settimeout(left)
                    try:
                        data = client.recv(2048)
                    except TimeoutError:
                        break
                    if data == token:
                        rtts.append(time.monotonic() - sent)
                        break
            stop.set()
            thread.join(1)
        finally:
            client.close()
            server.close()
        if not rtts:
            raise Unreachable(f"host {a} → host {b}: no reply to {count} probes")
        return statistics.median(rtts)

    def manifest(self) -> dict[str, Any]:
        return {
            "subnet": str(self.subnet),
            "mgmt": self.mgmt_addr,
            "switch": self.switch,
            "rtt_ms": self.rtt_ms,
            "loss": self.loss,
            "hosts": [
                {"host": i, "netns": self.netns(i), "addr": self.addr(i)} for i in range(self.hosts)
            ],
        }


# ------------------------------------------------------------------ CLI


def testnet_main(
    hosts: int = 3,
    rtt_ms: float = 0.0,
    loss: float = 0.0,
    data_dir: Path | None = None,
    nodes: bool = True,
    as_json: bool = False,
) -> int:
    """`meshrun testnet --hosts N`: N namespaces, and (unless nodes=False) a devstack in them.

    Host 0 runs the requester, hosts 1..N-1 compute nodes. Prints the manifest and
    waits for Ctrl-C; returns the exit code.
    """
    import tempfile

    reason = available()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(Testnet(hosts=hosts, rtt_ms=rtt_ms, loss=loss))
        manifest: dict[str, Any] = {"testnet": net.manifest()}
        if nodes:
            root = data_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="meshrun-testnet-"))
            )
            devstack = stack.enter_context(net.devstack(root))
            manifest["devstack"] = devstack.manifest()
        if as_json:
            print(json.dumps(manifest, indent=2), flush=True)
        else:
            print(f"testnet: {hosts} hosts on {net.subnet}, rtt {rtt_ms:g} ms, loss {loss:g}")
            for h in manifest["testnet"]["hosts"]:
                print(f"  host {h['host']}: {h['addr']}  (ip netns exec {h['netns']} …)")
            for n in manifest.get("devstack", {}).get("nodes", []):
                print(f"  {n['name']}: {n['rpc_url']}  token {n['token_file']}")
            print("Ctrl-C stops everything", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


__all__ = ["Testnet", "TestnetError", "Unreachable", "available", "remove_stale", "testnet_main"]
