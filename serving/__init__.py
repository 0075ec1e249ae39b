"""The assistant as an HTTP service (serve.py): one base model, its adapters, requests batched across adapters."""
