"""Serverless functions of tandem: the shared app factory, the tensor codec, the tokenizer."""
