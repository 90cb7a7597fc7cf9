"""Names of the two PEFT adapters a BA-LoRA model carries."""

TRAINABLE_ADAPTER = "default"  # B, A: start at (B0, A0), trained
FROZEN_ADAPTER = "balora_init"  # A0, -B0: frozen buffers, cancel the init
# Sub-folder of every save that holds both adapters as PEFT wrote them (for resume).
TRAINING_STATE_DIR = "balora_state"
# File names PEFT uses in an adapter folder.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
