"""Write a MiniLM-L6 sentence-transformers folder with random weights, for GPU runs without the real ones.

    python bench/random_minilm.py CONFIG_DIR OUT_DIR

CONFIG_DIR holds the model's configuration and tokenizer files without the weights (config.json,
tokenizer.json, modules.json, 1_Pooling/, ...): the compute per sentence is the real model's, the
embeddings are meaningless. Used where the weights package cannot be installed (a machine offline).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    from transformers import BertConfig, BertModel

    shutil.copytree(source, target, dirs_exist_ok=True)
    BertModel(BertConfig.from_pretrained(str(source))).save_pretrained(str(target))
    print(f"random-weight model written to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
