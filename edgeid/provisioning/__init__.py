"""Technician tooling behind `edgeid provision`: init (initialise), selftest, status,
factory-reset (reset) and rotate-keys (kek); certificates, config and broker are their parts.
The CLI drives this package; the running service never imports it."""
