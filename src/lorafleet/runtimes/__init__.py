"""Runtimes move payloads and call the algorithm's steps; they know nothing of its math."""
