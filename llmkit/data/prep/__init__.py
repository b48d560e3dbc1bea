"""The staged preparation pipeline: sources -> clean -> dedup (exact, MinHash) -> tokenizer -> encode -> shards,
as units of work (tasks.py) that run in this process or as submitit tasks (executors.py), each unit writing
its files where layout.py says. pipeline.py is the one entry: `prepare(spec, ...)`."""
