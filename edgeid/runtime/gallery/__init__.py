"""Galleries: encrypted, durable storage of subjects and faces, and their search."""
