"""Multi-head BERT classifier: data, model, training, evaluation, registry, engine and HTTP server."""
