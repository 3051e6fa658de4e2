"""The one-command local stack (`python -m infra.local.stack`, what `make up` runs)."""
