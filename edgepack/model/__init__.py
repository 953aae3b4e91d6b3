"""Reference decoders (plain PyTorch, edgepack/model/decoder.py) and each family's facts (families.py).

Kept free of imports so that reading a family's facts does not load torch; import from the modules:
edgepack.model.decoder (Decoder, causal_mask), edgepack.model.weights (load_decoder, read_hf_weights).
"""
