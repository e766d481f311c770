"""Reading and writing model files: lazy readers, LoRA folding, layouts as data, the streaming writer."""
