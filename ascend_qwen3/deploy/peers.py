"""The link between the launchers of a multi-node deployment: each node learns when another goes.

vLLM's own behaviour when one node of a data-parallel deployment dies is not what a process
manager needs: a headless follower whose leader is gone, or a leader whose follower's engine is
gone, may wait in a collective or a socket for a long time instead of exiting. So the launchers
keep their own link, independent of vLLM:

- the leader's launcher listens on ``PEER_PORT`` (all interfaces) and expects ``nodes - 1``
  followers; each follower's launcher connects to it (retrying while the leader starts);
- both ends send one byte every ``HEARTBEAT_S``; an end that reads nothing for ``TIMEOUT_S``,
  or sees the connection close (its peer's launcher exited or was killed: the kernel closes
  its sockets at once), declares the peer lost;
- a follower that has not reached the leader within ``startup_s`` (the same budget as the
  server's start-up) gives up, and so does a leader whose followers have not all connected.

``supervise`` (launcher.py) watches ``PeerLink.lost``: when it is set, the local server is
stopped (SIGTERM to its process group, SIGKILL after a grace period) and the launcher exits with
``PEER_LOST``, so Kubernetes (a LeaderWorkerSet recreates the whole group when one pod fails),
Docker or systemd restart the deployment as a whole.
"""

from __future__ import annotations

import socket
import threading
import time

HEARTBEAT_S = 2.0
TIMEOUT_S = 10.0        # no heartbeat for this long: the peer is lost (a machine gone silent)
PEER_LOST = 3           # the launcher's exit code when another node went away


class PeerLink:
    """One node's end of the launchers' link (``start()`` it; it runs in daemon threads)."""

    def __init__(self, node_rank: int, nodes: int, leader_address: str, port: int,
                 startup_s: float, heartbeat_s: float = HEARTBEAT_S, timeout_s: float = TIMEOUT_S,
                 log=None):
        self.node_rank, self.nodes = node_rank, nodes
        self.leader_address, self.port = leader_address, port
        self.startup_s, self.heartbeat_s, self.timeout_s = startup_s, heartbeat_s, timeout_s
        self.lost = threading.Event()
        self.reason = ""
        self._log = log or (lambda msg: None)
        self._closing = threading.Event()
        self._server: socket.socket | None = None

    # --- the outcome -------------------------------------------------------------------------
    def _lose(self, reason: str) -> None:
        if not self.lost.is_set() and not self._closing.is_set():
            self.reason = reason
            self.lost.set()

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            try:
                self._server.close()
            except OSError:
                pass

    # --- set-up ------------------------------------------------------------------------------
    def start(self) -> "PeerLink":
        if self.node_rank == 0:
            self._server = socket.create_server(("", self.port), reuse_port=False)
            self._server.settimeout(1.0)
            threading.Thread(target=self._accept, daemon=True, name="peer-accept").start()
            self._log(f"waiting for {self.nodes - 1} follower node(s) on port {self.port}")
        else:
            threading.Thread(target=self._connect, daemon=True, name="peer-connect").start()
        return self

    def _accept(self) -> None:
        deadline = time.monotonic() + self.startup_s
        joined = 0
        while joined < self.nodes - 1 and not self._closing.is_set():
            if time.monotonic() > deadline:
                self._lose(f"only {joined} of {self.nodes - 1} follower node(s) connected to port "
                           f"{self.port} within {self.startup_s:.0f} s")
                return
            try:
                conn, addr = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            joined += 1
            self._log(f"follower node connected from {addr[0]}")
            self._watch(conn, f"the follower node at {addr[0]}")

    def _connect(self) -> None:
        deadline = time.monotonic() + self.startup_s
        while not self._closing.is_set():
            try:
                conn = socket.create_connection((self.leader_address, self.port), timeout=5)
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._lose(f"could not reach the leader's launcher at {self.leader_address}:"
                               f"{self.port} within {self.startup_s:.0f} s ({exc})")
                    return
                time.sleep(1.0)
                continue
            self._log(f"connected to the leader node at {self.leader_address}:{self.port}")
            self._watch(conn, f"the leader node at {self.leader_address}")
            return

    # --- the heartbeats ----------------------------------------------------------------------
    def _watch(self, conn: socket.socket, who: str) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.settimeout(self.timeout_s)
        threading.Thread(target=self._send, args=(conn, who), daemon=True,
                         name="peer-send").start()
        threading.Thread(target=self._receive, args=(conn, who), daemon=True,
                         name="peer-receive").start()

    def _send(self, conn: socket.socket, who: str) -> None:
        while not self._closing.is_set() and not self.lost.is_set():
            try:
                conn.sendall(b".")
            except OSError as exc:
                self._lose(f"{who} went away ({exc})")
                return
            self._closing.wait(self.heartbeat_s)
        try:
            conn.close()
        except OSError:
            pass

    def _receive(self, conn: socket.socket, who: str) -> None:
        while not self._closing.is_set() and not self.lost.is_set():
            try:
                data = conn.recv(64)
            except socket.timeout:
                self._lose(f"{who} sent nothing for {self.timeout_s:.0f} s")
                return
            except OSError as exc:
                self._lose(f"{who} went away ({exc})")
                return
            if not data:
                self._lose(f"{who} went away (its launcher closed the link)")
                return
