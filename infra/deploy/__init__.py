"""The deployment files, generated for a bundle of N stages (`python -m infra.deploy`): compose,
Kubernetes, Knative, Cloud Run and KServe from one description of the stages (plan.py)."""
