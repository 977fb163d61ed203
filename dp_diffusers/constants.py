"""File names of an adapter folder (the contract in shared/design.md), defined once.

Imports nothing, so every layer (the privacy core included) can use them without loading the rest.
"""

#: The LoRA weights, in diffusers' LoRA format (diffusers' own ``LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Marks a DP-LoRA adapter folder (train_dp_lora.py's output): base model, weights file, class embedding, classes.
ADAPTER_CONFIG_NAME = "dp_lora_config.json"
#: The privacy guarantee (``dp_diffusers.privacy.report``); absent for runs without DP.
DP_REPORT_NAME = "dp_report.json"
#: The evaluation's numbers (``dp_diffusers.evaluation``).
METRICS_NAME = "metrics.json"
#: The trained class embedding's folder (``--train_class_embedding``).
CLASS_EMBEDDER_FOLDER = "class_embedder"
#: A DiT adapter's trained label rows for new classes (``DiTClassRows``).
CLASS_ROWS_FOLDER = "class_rows"
CARD_NAME = "README.md"
SAMPLES_NAME = "samples.png"
EPSILON_PLOT_NAME = "epsilon.png"
