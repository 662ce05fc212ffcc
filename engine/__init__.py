"""Self-supervised pre-training engine: trainer, methods, models and data. Importing it initialises no CUDA."""
