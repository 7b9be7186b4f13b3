"""Re-parameterizable blocks and (later) model growth."""
