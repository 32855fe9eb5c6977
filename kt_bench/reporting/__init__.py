"""Reading a results folder: comparison tables, plots, the report and the status of its cells."""
