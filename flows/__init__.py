"""digitflow entry points: the command line and the Prefect flows."""
