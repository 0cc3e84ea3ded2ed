"""The engine: one base model, resident adapters in stacked slots, one running batch.
Knows token ids and tensors; nothing of text, HTTP, gRPC or files."""
