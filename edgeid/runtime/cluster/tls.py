"""Ray's TLS between nodes with the site CA (``RAY_USE_TLS``): every Ray process of the
cluster (head, workers, the ingest's driver) presents a certificate the site CA signed and
checks its peers' against the CA, so a machine without one can neither join nor listen in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.config.settings import ClusterSettings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web.tls import TLS_DIR

CA_FILE = "cluster-ca.crt"
CERT_FILE = "cluster.crt"
KEY_FILE = "cluster.key"


class ClusterSetupError(BadInputError):
    """The box is not provisioned for the cluster (no CA, certificate or key)."""


@dataclass(frozen=True)
class ClusterTls:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, home: Path, settings: ClusterSettings) -> ClusterTls:
        folder = home / TLS_DIR
        tls = cls(
            Path(settings.ca_file or folder / CA_FILE),
            Path(settings.cert_file or folder / CERT_FILE),
            Path(settings.key_file or folder / KEY_FILE),
        )
        for what, path in (("site CA", tls.ca), ("certificate", tls.cert), ("key", tls.key)):
            if not path.is_file():
                raise ClusterSetupError(
                    f"{path}: no cluster {what}; provision this box for the cluster first "
                    "(README 'Large cases on several boxes')"
                )
        return tls

    def env(self) -> dict[str, str]:
        return {
            "RAY_USE_TLS": "1",
            "RAY_TLS_SERVER_CERT": str(self.cert),
            "RAY_TLS_SERVER_KEY": str(self.key),
            "RAY_TLS_CA_CERT": str(self.ca),
        }

    def apply(self) -> None:
        """For this process; before Ray is imported (its core reads them once, then)."""
        os.environ.update(self.env())
