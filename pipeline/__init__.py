"""Orchestration around the stages: the `rmpipe` CLI, Prefect flows and deployments, the batch watcher."""
