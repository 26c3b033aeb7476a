"""Temporal activities: the I/O side of billing (documents, storage, rendering)."""
