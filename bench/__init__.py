"""`pgw bench`: the load generator, the baselines and the report (see bench/README.md)."""
