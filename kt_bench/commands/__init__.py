"""The command line: one module per command, each with its parser and its code."""
