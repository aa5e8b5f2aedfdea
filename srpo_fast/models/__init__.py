from .fsdp import (build_lr_scheduler, build_optimizer, clip_grad_norm, set_sum_gradient_reduction, shard_model,
                   vision_tower)
from .weights import checkpoint_names, export_hf_safetensors, iter_full_weights
