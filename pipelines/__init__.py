"""Prefect flows and deployments that run the DVC pipeline (see pipelines/README.md)."""
