"""What the scripts need besides the loop, one job per module (the banking product itself is in banking/).

- cli: the usage-error type and the exit-status convention every script follows
- files: atomic writes and the lock that keeps two runs out of one directory
- precision: --precision to a dtype, and the autocast context
- fast_modules: faster stand-ins for T5's dropout, linear layers and GELU, computing the same functions
- models: the one place that turns --model into a model and tokenizer (tiny, a directory, a hub name)
- tiny_model: the offline `tiny` model and tokenizer, built once into a cache directory
- checkpoint_streaming: a checkpoint read tensor by tensor into a model on the meta device (QLoRA, FSDP)
- architectures: T5s from a config with random weights (the flan-t5 sizes; a toy T5 for tests)
- train_args: train.py's options, their two default sets (flan-t5-base and tiny) and their checks
- run_dir: the output directory's layout and policy (refuse, resume, overwrite)
- checkpoints: training progress, RNG states, save/load/rotate for exact resume
- distributed: torchrun setup and the reductions the loop needs
- metrics: metrics.jsonl, the loss plot, peak memory
- lr_schedule: linear warm-up, then linear decay
"""
