"""Case ingest: seized media in, faces clustered and searched against the galleries, every
search audited; an encrypted case store with its report and purge."""
