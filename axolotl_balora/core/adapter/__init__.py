"""The adapter on the model: PiSSA factors, the two-adapter layer, export and checkpoint state.

Rule: imports `..config`, `..ops` and `..parallel`, plus peft and transformers; never the
training layer (an adapter works without a Trainer: export, merge, plain inference).
"""
