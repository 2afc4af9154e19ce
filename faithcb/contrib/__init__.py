"""Extras beside the monitor.

- `proxy`: proxy-tuned decoding;
- `_models`: `load_smollm2`, a real pretrained model, offline.
"""
