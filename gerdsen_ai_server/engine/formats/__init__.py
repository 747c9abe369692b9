"""Model formats: the loader factory, GGUF conversion, BERT-family encoders."""
