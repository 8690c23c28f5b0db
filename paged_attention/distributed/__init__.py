"""Scale-out: tensor parallelism (Megatron-style, over torch.distributed) and the
executors that start its worker ranks (multiprocessing or Ray).

- `sharding.py`: which slice of each weight a rank owns, and the per-rank model shape;
- `weights.py`: reading only those slices (safetensors `get_slice`, GGUF per tensor);
- `parallel_state.py`: a rank's process groups and its collectives (with byte/time counters);
- `worker.py`: one worker rank: its model shard, KV pool and step loop;
- `executor.py`: the multiprocessing executor (worker lifecycle, health, shutdown);
- `ray_executor.py`: the same workers as Ray actors;
- `driver.py`: the driver's model runner, which sends every step to the workers;
- `benchmark.py`: TP=N against TP=1 (tokens/s, compute vs all-reduce, bytes per step).
"""
