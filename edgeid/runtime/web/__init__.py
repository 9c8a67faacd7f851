"""The local web UI and ``/api/v1``: server-rendered pages, sessions, tokens, roles, audit."""
