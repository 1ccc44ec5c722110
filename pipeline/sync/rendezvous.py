"""Where the trainer's process groups meet: every rendezvous store listens on one chosen address.

torch's TCPStore binds every interface whatever host it is given (`*:PORT`), and neither it nor gloo
authenticates a peer: whoever reaches the port can disturb a group as it forms or take a member's slot
(the trainer world trades pickles; the transfer group carries the weights). So each store is created
on a socket bound here first, to the one address its members dial (`listen_socket`, handed to torch as
`TCPStore(master_listen_fd=...)`): loopback when everything runs on one host. A port is bound before
anyone is told it, so no other process can take it in between (port 0: the OS picks one).

`rendezvous_address` is that address for the transfer group (the engines' workers dial it);
`init_trainer_world` does the same for the trainer ranks' own group (DeepSpeed's MASTER_ADDR /
MASTER_PORT) before DeepSpeed would create its store on every interface.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class RendezvousError(RuntimeError):
    """The rendezvous address cannot be used (one line naming the setting)."""


def resolve(host: str, port: int = 0) -> tuple[socket.AddressFamily, tuple]:
    """(family, sockaddr) of `host`, IPv4 first (gloo and vLLM's NCCL store dial IPv4)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(f"{host}: cannot resolve it ({e.strerror})") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, address = infos[0]
    return family, address


def listen_socket(host: str, port: int = 0, backlog: int = 128, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to `host` (its first address) and `port` (0: the OS picks), listening.
    SO_REUSEADDR as uvicorn and torch set it (connections of a previous holder may linger in TIME_WAIT);
    a live listener elsewhere on that address and port still fails the bind (OSError). `reuse_port`:
    also SO_REUSEPORT, to bind a port the launcher reserved that way (launch/train.py `reserve_port`;
    the kernel allows it to processes of the same user only)."""
    family, address = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """`port` on `host` held for a rank 0 started later (launch/train.py `reserve_port`): bound with
    SO_REUSEPORT alone and not listening, so only `store_listener` of the same user can bind it too. A
    port anyone holds (a listener, another run's reservation) fails first (OSError): two runs sharing
    it through SO_REUSEPORT would have their ranks' connections split between their stores."""
    with listen_socket(host, port):  # SO_REUSEADDR alone: it fails on any holder but TIME_WAIT leftovers
        pass
    family, address = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def store_listener(host: str, port: int) -> socket.socket:
    """Rank 0's listening socket for its store on host:port: a plain bind, or, where the launcher
    reserved the port (`reserve`), one beside the reservation, unless someone already listens there
    (another run's rank 0: the same user may share a SO_REUSEPORT port, and must not)."""
    try:
        return listen_socket(host, port)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or answers(host, port):
            raise
    return listen_socket(host, port, reuse_port=True)


def answers(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address) is this host's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(resolve(host)[1][0]).is_loopback
        except (RendezvousError, ValueError):
            return False


def address_towards(host: str) -> str | None:
    """This host's address on its route to `host` (the address `host` sees it by); None without a route.
    A UDP socket's connect only picks the route: no packet is sent."""
    try:
        family, address = resolve(host, 9)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return probe.getsockname()[0]
    except (OSError, RendezvousError):
        return None


def url_host(url: str) -> str:
    return urlsplit(url if "//" in url else f"http://{url}").hostname or ""


def rendezvous_address(configured: str, server_urls: str | list[str]) -> str:
    """The address trainer rank 0 binds the transfer group's store to, which the engines' workers dial:
    `sync.host` when set, else loopback when every engine is on this host, else this host's address on
    the route to the first engine. Never a loopback address when an engine is elsewhere: a hostname that
    resolves to 127.0.1.1 (Debian's /etc/hosts) would be bound, and the workers would dial their own
    host. RendezvousError: one line naming sync.host."""
    urls = [u.strip() for u in (server_urls.split(",") if isinstance(server_urls, str) else server_urls)]
    hosts = [url_host(u) for u in urls if u]
    remote = [h for h in hosts if not is_loopback_host(h)]
    if configured:
        if remote and is_loopback_host(configured):
            raise RendezvousError(
                f"sync.host={configured} is a loopback address here, but engine {remote[0]} is on another "
                f"host and could not reach it; set sync.host to this host's address on that network"
            )
        return configured
    if not remote:
        return "127.0.0.1"
    local = address_towards(remote[0])
    if local is None or ipaddress.ip_address(local).is_loopback:
        raise RendezvousError(
            f"sync.host: no route from this host to engine {remote[0]}; set sync.host to this host's "
            f"address on the engines' network"
        )
    return local


@contextmanager
def gloo_bound_towards(host: str):
    """Make gloo bind the interface this process uses to reach `host` (the rendezvous host).

    Left alone, gloo binds the address its hostname resolves to, or loopback when that address is not
    on this machine (common: /etc/hosts, containers, namespaces); the other side then dials its own
    loopback and the group never forms. GLOO_SOCKET_IFNAME set by the user is respected."""
    interface = None
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        import psutil

        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP: no packet is sent
                probe.connect((host, 9))
                local = probe.getsockname()[0]
        except OSError:  # not an IPv4 route: leave gloo's default
            local = None
        if local:
            interface = next(
                (
                    name
                    for name, addresses in psutil.net_if_addrs().items()
                    if any(a.address == local for a in addresses)
                ),
                None,
            )
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    try:
        yield
    finally:
        if interface:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


DEFAULT_ROUTE_PROBE = "192.0.2.1"  # TEST-NET-1: only picks the route (no packet is sent)


def master_address(host: str, elsewhere: bool) -> str:
    """The address rank 0's store binds and this host's ranks dial: MASTER_ADDR, unless ranks run on
    other hosts (`elsewhere`) and it is a name that resolves to loopback here (Debian maps a host's own
    name to 127.0.1.1; the other hosts resolve it to its real address): then this host's address on its
    default route. A loopback address given as such (127.x, ::1, localhost) is refused."""
    if not elsewhere or not is_loopback_host(host):
        return host
    literal = host.strip("[]") == "localhost"
    with contextlib.suppress(ValueError):
        literal = bool(ipaddress.ip_address(host.strip("[]")))
    local = None if literal else address_towards(DEFAULT_ROUTE_PROBE)
    if local is None or ipaddress.ip_address(local).is_loopback:
        raise RendezvousError(
            f"MASTER_ADDR={host} is a loopback address on this host, but ranks run on other hosts and "
            f"could not reach it; pass --master-addr with this host's address on their network"
        )
    log.info("MASTER_ADDR=%s resolves to loopback here; the ranks' store listens on %s", host, local)
    return local


def init_trainer_world(backend: str, timeout: timedelta, environ=os.environ) -> bool:
    """The trainer ranks' process group from the launcher's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    with rank 0's store on a socket bound to MASTER_ADDR only (torch's `env://` would listen on every
    interface) and gloo's own sockets on the interface towards MASTER_ADDR (loopback on one host).
    DeepSpeed's `init_distributed` afterwards finds torch.distributed initialised and adopts the group.
    False (nothing done) without those variables or for a backend other than gloo and nccl: DeepSpeed
    then forms the group its own way."""
    import torch
    import torch.distributed as dist
    from torch.distributed import TCPStore

    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if dist.is_initialized() or backend not in ("gloo", "nccl") or not all(k in environ for k in needed):
        return False
    rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    local = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or world)
    host = master_address(host, elsewhere=local < world)
    if rank == 0:
        try:
            listener = store_listener(host, port)
        except OSError as e:
            raise RendezvousError(
                f"MASTER_PORT={port} on MASTER_ADDR={host}: {e.strerror or e} (the trainer ranks' "
                f"rendezvous; --master-port picks another)"
            ) from None
        # TCPStore owns the descriptor from here (it closes it with the store)
        store = TCPStore(host, port, world, True, timeout, master_listen_fd=listener.detach())
    else:
        store = TCPStore(host, port, world, False, timeout)
    extra = {}
    if backend == "nccl" and world > 1:  # as DeepSpeed binds it (its TorchBackend.init_process_group)
        extra["device_id"] = torch.device("cuda", int(environ.get("LOCAL_RANK", "0")))
    with gloo_bound_towards(host):
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **extra)
    return True
