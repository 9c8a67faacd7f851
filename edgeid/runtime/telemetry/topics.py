"""MQTT topics of one device: ``edgeid/<site>/<device>/{status,health,events}``."""

from __future__ import annotations

from dataclasses import dataclass

from edgeid.runtime.config.settings import DeviceSettings
from edgeid.runtime.telemetry.schema import TOPIC_ROOT, MessageKind


@dataclass(frozen=True)
class Topics:
    site: str
    device: str

    @classmethod
    def of(cls, device: DeviceSettings) -> Topics:
        return cls(site=device.site, device=device.device_id)

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.site}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def of_kind(self, kind: MessageKind) -> str:
        return f"{self.base}/{kind}"

    @property
    def client_id(self) -> str:
        return f"edgeid-{self.site}-{self.device}"
