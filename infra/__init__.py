"""Deployment: the local launcher (infra/local) and, beside it, container and cluster files."""
