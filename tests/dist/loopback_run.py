"""`python tests/dist/loopback_run.py [torchrun args]`: torchrun whose stores listen on 127.0.0.1 only.

torchrun's agent creates its TCPStores (the rendezvous store and the one the ranks join) listening on every
interface, whatever host it is given; a test must not open the machine to its network. TCPStore accepts an
already-listening socket (`master_listen_fd`), so every store this process serves is handed a socket bound to
127.0.0.1 first. Test-launcher use only.
"""
from __future__ import annotations

import socket
import sys

import torch.distributed as dist
from torch.distributed.run import main

_TCPStore = dist.TCPStore


def loopback_store(host_name, port=0, world_size=None, is_master=False, *args, **kwargs):
    if is_master and kwargs.get("master_listen_fd") is None and len(args) < 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(port)))
        sock.listen(512)
        port = sock.getsockname()[1]
        kwargs["master_listen_fd"] = sock.detach()
    return _TCPStore(host_name, port, world_size, is_master, *args, **kwargs)


def patch() -> None:
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_tcp
    import torch.distributed.elastic.utils.distributed as elastic_utils

    for module in (dist, c10d_backend, static_tcp, elastic_utils):
        if getattr(module, "TCPStore", None) is _TCPStore:
            module.TCPStore = loopback_store


if __name__ == "__main__":
    patch()
    sys.exit(main(sys.argv[1:]))
