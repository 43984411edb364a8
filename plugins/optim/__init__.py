"""Built-in optimizer plugins: ``sgd``, ``adam``, ``adamw`` (hook ``register_optimizers``)."""
