"""LoraConfig field names per peft release, recorded from each wheel by
`scripts/check_interop --record-peft VERSION...` (do not edit by hand)."""

LORA_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "0.10.0": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
        "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
        "target_modules", "task_type", "use_dora", "use_rslora",
    ),
    "0.12.0": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
        "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
        "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
    ),
    "0.13.2": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
        "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
        "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
    ),
    "0.14.0": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
        "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
        "peft_type", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
        "task_type", "use_dora", "use_rslora",
    ),
    "0.15.2": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
        "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
        "peft_type", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
        "task_type", "trainable_token_indices", "use_dora", "use_rslora",
    ),
    "0.17.1": (
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
        "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
        "peft_type", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
        "target_modules", "target_parameters", "task_type", "trainable_token_indices", "use_dora",
        "use_qalora", "use_rslora",
    ),
    "0.21.2": (
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
        "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "kasa_config",
        "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
        "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size",
        "r", "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters",
        "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
        "use_rslora", "velora_config",
    ),
}
