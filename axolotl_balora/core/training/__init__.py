"""The Trainer mixin and what only training needs: the loss path, the head check, the
reference forward's inputs, the logged terms.

Rule: may import every other core layer; nothing in the core imports it back.
"""
