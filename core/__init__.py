"""Process-wide plumbing shared by the API, the worker and the devstack: settings, logging, tracing."""
