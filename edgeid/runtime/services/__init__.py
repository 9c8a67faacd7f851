"""The accountable service layer: the one way every door (web pages, ``/api/v1``, the CLI,
case ingest) reaches personal and biometric data.

Each operation takes a ``Caller`` (who, and what they may do) and, where the law would ask for
one, a ``Justification`` (case number and reason). It checks access itself, recording every
refusal, and writes its audit record before it returns data or acknowledges a change: if the
record cannot be written, nothing is revealed or changed. Front ends only translate.
"""
