"""`tuneforge export`: merge a trained adapter into its base and write a Hugging Face folder or a GGUF file.

    tuneforge export --adapter outputs/lora-run --out exported/hf                     # merged HF folder
    tuneforge export --adapter outputs/lora-run --out exported/gguf --format gguf --quant q8_0
    tuneforge export --model outputs/full-run --out exported/bf16 --dtype bf16 --max-shard-size 500MB

- source.py: which base model, which method wrote the adapter, load + merge through the method registry.
- hf.py: the Hugging Face folder (sharded safetensors, config, tokenizer + chat template, generation config with
  the stop tokens), adapter folders for methods that cannot merge, bitsandbytes 4-bit/8-bit folders.
- gguf_file.py: one GGUF file for llama.cpp / Ollama (llama and qwen2 layouts; f32, f16, bf16, q8_0).
- cli.py: the verb's options and the temp-folder-then-rename output.
"""
