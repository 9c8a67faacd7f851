"""Signed A/B updates: bundles (``bundle``, ``manifest``, ``signing``), slots (``slots``),
and the persistent state machine that installs, checks, commits and rolls back (``manager``,
``state``, ``health``, ``events``). ``crashpoints`` is a test hook, inert on a real box.
"""
