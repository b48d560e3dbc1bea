"""OmegaConf resolvers used by conf/: registered when llmkit is imported."""

import math

from omegaconf import OmegaConf

# ${mul:${trainer.devices},${trainer.num_nodes}}: FSDP's data-parallel size follows the allocation
OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(int(f) for f in factors), replace=True)
# ${gpus_per_node:${trainer.accelerator},${trainer.devices}}: GPUs to request from SLURM (null on CPU)
OmegaConf.register_new_resolver(
    "gpus_per_node", lambda accelerator, devices: int(devices) if accelerator in ("gpu", "cuda") else None, replace=True
)
