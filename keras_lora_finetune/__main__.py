"""`python -m keras_lora_finetune` is `keras-lora-finetune`."""

import sys

from keras_lora_finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
