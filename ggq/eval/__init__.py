"""Evaluating GGUF files through llama.cpp: ``perplexity`` (llama-perplexity's protocol and numbers),
``kld`` (its KL-divergence statistics), ``baseline`` (llama.cpp's own Q4_0), ``llama_tools`` (its
programs), ``fileinfo`` (what a file is, for the tables). The ``ggq ppl`` command is ``ggq.ppl``."""
