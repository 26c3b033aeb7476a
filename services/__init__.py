"""Business operations over the database: one home for every rule.

Each takes a session and plain inputs; no Temporal, no HTTP. The API and the activities are
thin shells around these.
"""
