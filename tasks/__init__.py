"""digitflow pipeline steps: one module per DVC stage, each a plain function."""
