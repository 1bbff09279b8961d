"""Scale-out with torch.distributed, applied to a built model from outside (as torchtitan's
parallelize does): a device mesh of data-parallel x expert-parallel ranks (`mesh`), FSDP2 sharding
(`fsdp`), all-to-all expert parallelism (`expert_parallel`), the trainer that ties them to the
single-process loop (`trainer`), distributed checkpoints (`checkpoint`) and the per-GPU memory and
communication arithmetic (`memory`). One process is the world-size-1 case of the same code."""
