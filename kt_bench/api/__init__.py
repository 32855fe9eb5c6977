"""The method plugin API (Method, Needs, Batch, registration) and the loading of plugin folders."""
