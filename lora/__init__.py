"""LoRA from scratch; depends on torch.nn only.

layers.py  LoRALinear (named adapters on one Linear, merge/unmerge)
rows.py    AddedRows (an adapter's trainable rows appended to a frozen nn.Embedding: added tokens)
inject.py  add_lora by name pattern, mark_only_lora_trainable, parameter counts
adapters.py  adapter files, switching, merge_and_unload, PEFT export
rank.py    rank strategies (fixed, mixed, high-rank warm-up, dynamic allocation) behind apply_rank_strategy
compose.py  one adapter whose update is the weighted sum of others' (exact, or SVD-truncated)
int8.py    8-bit frozen base under the adapters
"""
from .adapters import (AdapterMismatchError, export_peft, list_adapters, load_adapter, merge_and_unload,
                       read_adapter_metadata, save_adapter, set_active_adapter)
from .inject import (TARGET_PRESETS, add_lora, count_parameters, describe_trainable, find_targets, lora_modules,
                     mark_only_lora_trainable, remove_adapter)
from .layers import AdapterSpec, LoRALinear
from .rank import (STRATEGIES, DynamicRankAllocator, HighRankWarmup, apply_rank_strategy, parse_rank_spec,
                   truncate_adapter)
