"""Benchmarks that run offline: a task registry (MMLU, ARC, HellaSwag, PIQA, HumanEval, your own files),
scoring (log-likelihood multiple choice with a shared-context KV cache, exact match, code execution),
results with standard errors and a composite, and paired tests between two models on the same questions.

    tasks.py      formats and the built-in tasks      custom.py     tasks_dir= files (JSONL / YAML)
    data.py       offline data: fetch once, read       scoring.py    log-likelihoods, shared context
    runner.py     one scorer per kind; evaluate()      metrics.py    stderr, baselines, composite, pass@k
    execution.py  guarded subprocesses for code        paired.py     McNemar, paired bootstrap, verdicts
    results.py    the results file and its table

`llmkit bench` (llmkit/commands/bench.py) and the training callback (llmkit/lit/downstream.py) both call
`runner.run_task`. Nothing is imported here, so that `llmkit report` reads results without torch.
"""
