"""Which ggml type each tensor of a file gets: llama-quantize's recipes (``recipe``), a policy over
the ggml types of ``ggq.ggml``, kept apart from the GGUF format of ``ggq.gguf``."""
