"""Reports people read: the pipeline run's self-contained HTML page (`reporting.html`), drawn from the
numbers the flows collect. Outside the model library (`snapgen_model` trains, samples, evaluates and
exports; it does not draw web pages) and outside `flows` (which only orchestrates)."""
