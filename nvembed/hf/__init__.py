"""The Hugging Face model, in one place: ``NVEmbedConfig``, ``NVEmbedModel`` (bidirectional switch, pooling heads,
tokenisation with instruction masking, ``forward``, ``encode``) and the sentence-transformers module.

Self-contained: its files import only each other (relatively), torch, transformers and sentence-transformers, never
the rest of nvembed, because an export copies them into the model folder as its remote code (:data:`FILES`).
Training (:mod:`nvembed.model`) wraps the very ``NVEmbedModel`` with what only training needs.
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))
FILES = ("configuration_nvembed.py", "inputs_nvembed.py", "modeling_nvembed.py", "st_nvembed.py")
"""The files an export copies next to its weights (``auto_map`` and ``modules.json`` name them)."""
