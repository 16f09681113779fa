"""Built-in passes. Each module registers its pass through the `onnxopt.passes` entry-point group,
exactly as a third-party pass would; the core never imports them by name."""
