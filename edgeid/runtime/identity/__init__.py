"""The box's own identity: its ed25519 device key (signs audit checkpoints, names the box)."""
