"""The gateway's listening socket: bound here, or inherited from `warmserve up`.

`up` binds the gateway's port once and hands the socket to every gateway process it starts, so
while a gateway restarts, new connections wait in the kernel's backlog instead of being refused.
"""

from __future__ import annotations

import socket

BACKLOG = 2048


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen: the port is known before the server starts and early connections queue.

    The socket is created with proto=IPPROTO_TCP, which asyncio requires before it sets TCP_NODELAY
    on accepted connections (with proto 0 every keep-alive response waits ~40 ms for a delayed ACK).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(BACKLOG)
    return sock


def inherited_socket(fd: int) -> socket.socket:
    """The listening socket a parent passed as file descriptor `fd` (family and protocol read from it)."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        raise ValueError(f"file descriptor {fd} is not a listening TCP socket")
    return sock
