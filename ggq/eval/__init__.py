"""Evaluating GGUF files through llama.cpp: ``perplexity`` (llama-perplexity's protocol and numbers)
and ``report`` (the ``ggq ppl`` command's progress bars, table and JSON)."""
