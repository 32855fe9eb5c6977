"""One test module per method: its formula, gradient and reference re-statement together."""
