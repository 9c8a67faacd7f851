"""sd_notify: tell systemd that the service is ready, alive, busy or stopping.

systemd-python's ``systemd.daemon.notify`` is used when it is installed (the ``systemd`` extra);
otherwise the same datagram goes over the documented ``NOTIFY_SOCKET`` protocol directly: one
``AF_UNIX``/``SOCK_DGRAM`` message of newline-separated ``KEY=value`` assignments, to a socket
path or, when the address starts with ``@``, to a Linux abstract socket. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op that returns False, so ``edgeid serve`` behaves the
same in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from types import ModuleType

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# systemd truncates STATUS= in `systemctl status`; a shorter line also keeps datagrams small.
MAX_STATUS_CHARS = 200


def _systemd_daemon() -> ModuleType | None:
    """systemd-python's daemon module, or None when the optional extra is not installed."""
    try:
        from systemd import daemon
    except ImportError:
        return None
    module: ModuleType = daemon
    return module


def socket_address(raw: str) -> str | bytes:
    """The ``sendto`` address for a NOTIFY_SOCKET value: ``@name`` is an abstract socket."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    """Sends notify messages to the socket named by ``env`` (default: the process environment).

    systemd-python reads ``os.environ`` itself, so it is used only when ``env`` is the real
    environment; an injected mapping (tests, a supervisor of our own) always takes the plain
    protocol, which is what systemd-python speaks on the wire anyway.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._daemon = _systemd_daemon() if env is None else None

    @property
    def enabled(self) -> bool:
        return bool(self._env.get(NOTIFY_SOCKET_ENV))

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one message; True when systemd got it.

        A failure to notify is logged, never raised: a service must not die because its
        supervisor went away.
        """
        raw = self._env.get(NOTIFY_SOCKET_ENV)
        if not raw or not assignments:
            return False
        message = "\n".join(assignments)
        if self._daemon is not None:
            return bool(self._daemon.notify(message))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), socket_address(raw))
        except OSError as exc:
            logger.warning("could not notify systemd at %s: %s", raw, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        return self.send(*_status_line(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status_line(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time, e.g. while TensorRT engines are built."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog_interval_s(self) -> float | None:
        """The WatchdogSec= systemd expects pings within, or None when no watchdog is armed.

        WATCHDOG_PID, when set, names the process the watchdog is for; a child that inherited
        the environment must not ping on its parent's behalf.
        """
        usec = self._env.get(WATCHDOG_USEC_ENV)
        pid = self._env.get(WATCHDOG_PID_ENV)
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            logger.warning("ignoring WATCHDOG_USEC=%r: not a whole number", usec)
            return None
        return value / 1_000_000 if value > 0 else None


def _status_line(text: str | None) -> list[str]:
    if text is None:
        return []
    flat = " ".join(text.split())  # one line: a newline would start a new assignment
    return [f"STATUS={flat[:MAX_STATUS_CHARS]}"]


def notify_ready(status: str | None = None) -> bool:
    """``READY=1`` (with an optional ``STATUS=``) to the process's own supervisor."""
    return Notifier().ready(status)


def notify_status(text: str) -> bool:
    return Notifier().status(text)


def notify_stopping(status: str | None = None) -> bool:
    return Notifier().stopping(status)
