"""tsae: harvest → train → analyze sparse autoencoders, plain and tokenized, on LM activations."""

__version__ = "0.1.0"
