"""The model math, once: each family's facts (families.py, config.py), rotary frequencies (rope.py), the decoder
blocks (decoder.py), KV-cache strategies (cache.py) and weight loading (weights.py).

Kept free of imports so that reading a family's facts does not load torch.
"""
