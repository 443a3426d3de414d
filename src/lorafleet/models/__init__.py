"""Models: loading the frozen base model, PEFT adapters, rank slicing and splitting."""

from lorafleet.models.loading import default_target_modules, head_module_names, load_base_model

__all__ = ["default_target_modules", "head_module_names", "load_base_model"]
