"""The v1 HTTP API: FastAPI over PostgreSQL and Temporal (``uvicorn api.main:app``)."""
