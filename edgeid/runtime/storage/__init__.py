"""Crash-safe file writing shared by every store on the box."""
