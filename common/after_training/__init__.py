"""After training: finding an adapter and its base, prompting, staged outputs, GGUF, model cards."""
