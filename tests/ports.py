"""A free TCP port on loopback, for the process groups, launchers and S3 servers the tests start."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
