"""The sealing kernel every store on the box shares: AES-256-GCM envelopes bound to where they
belong (``crypto``), the device keyring of data keys wrapped by a key-encryption key and its
providers (``keys``, ``key_choice``), and the checksummed append-only frame format
(``framed_log``). Galleries, the audit log, cases and accounts build on it; it imports none of
them.
"""
