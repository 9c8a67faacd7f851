"""Local users, roles, password hashes, sessions, API tokens and login throttling."""
